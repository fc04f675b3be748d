"""Fault: Redis (append-only persistence) restarted in the middle of a run."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from service_helpers import assert_every_batch_trained_once, events, step_rows, tiny_config
from services.broker import Broker
from services.orchestrator import run
from services.progress import read_progress
from services.redis_server import EmbeddedRedis, connect

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_restart_with_append_only_file_loses_nothing(ray_session, tmp_path: Path) -> None:
    steps, batch = 8, 2
    # A corpus smaller than the run: the data stream wraps around mid-run too.
    config = tiny_config(tmp_path, f"train.steps={steps}", f"train.batch_size={batch}", "data.num_documents=12")
    data_dir, port = tmp_path / "redis", _free_port()

    def server() -> EmbeddedRedis:
        # Not tied to the thread that starts it: the restart happens on a helper thread.
        return EmbeddedRedis(data_dir=data_dir, port=port, appendonly=True, appendfsync="always",
                             die_with_parent=False)

    servers = [server().start()]
    url = servers[0].url
    broker = Broker(connect(url), config.service.namespace)
    restarted: dict = {}

    def restart_redis_mid_run() -> None:
        while True:
            try:
                progress = read_progress(broker)
            except Exception:
                progress = None
            if progress is not None and progress.step >= 2:
                break
            time.sleep(0.01)
        restarted["at_step"] = progress.step
        servers[0].stop()
        time.sleep(1.0)  # every role sees connection errors for a while
        servers.append(server().start())
        restarted["done"] = True

    restarter = threading.Thread(target=restart_redis_mid_run, daemon=True)
    restarter.start()
    try:
        stats = run(config, progress=False, redis_url=url)
        restarter.join(timeout=30)
    finally:
        for redis_server in servers:
            redis_server.stop()
    assert restarted.get("done") and restarted["at_step"] < steps
    rows = step_rows(tmp_path / "run")
    assert_every_batch_trained_once(rows, config)
    assert events(tmp_path / "run") == []  # nothing dropped, no role restarted
    assert stats["step"] == steps
