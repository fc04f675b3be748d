"""Fault: Redis (append-only persistence) restarted in the middle of a run, or gone for good."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import ray

from refine.config import run_tokenizer
from service_helpers import assert_every_batch_trained_once, events, step_rows, tiny_config
from services.broker import Broker
from services.orchestrator import Orchestrator, ServiceError, run
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


def _ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def test_driver_gives_up_on_redis_gone_for_good(ray_session, tmp_path: Path) -> None:
    """Past the outage tolerance the driver ends the run naming the Redis URL; a Ctrl-C during the
    retries is the graceful stop, not a traceback; a learner that returned ends the loop while Redis is down."""
    config = tiny_config(tmp_path)
    port = _free_port()
    servers = [EmbeddedRedis(port=port).start()]
    url = servers[0].url
    orchestrator = Orchestrator(config, run_tokenizer(config), url, config.service.namespace, resume=False,
                                progress=False)
    servers[0].stop()
    # Should the driver retry forever, Redis comes back later: the test fails instead of hanging.
    rescue = threading.Timer(30, lambda: servers.append(EmbeddedRedis(port=port, die_with_parent=False).start()))
    rescue.start()
    # A learner still training (a lambda: Ray's workers cannot import this test module).
    learner = ray.remote(num_cpus=0)(lambda: time.sleep(60)).remote()
    orchestrator.learner_future = learner
    orchestrator.outage.timeout_s = 2.0  # the rule's minute, shortened
    previous = signal.signal(signal.SIGALRM, _ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 0.8)  # Ctrl-C while the driver waits for Redis
    try:
        started = time.monotonic()
        with pytest.raises(ServiceError, match=rf"Redis at {re.escape(url)} unreachable for 2s"):
            orchestrator._loop()
        assert time.monotonic() - started < 10
        assert orchestrator.stopping  # the Ctrl-C was taken as the graceful stop
        # The learner returned (it gave up on Redis too): the loop ends at once, Redis still down.
        orchestrator.learner_future = ray.put("{}")
        orchestrator.outage.succeeded()
        orchestrator._loop()
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the Redis retries escaped the driver's loop")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        rescue.cancel()
        ray.cancel(learner, force=True)
        orchestrator.client.close()
        for server in servers:
            server.stop()
