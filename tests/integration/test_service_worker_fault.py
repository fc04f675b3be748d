"""Faults: a rollout worker killed (SIGKILL) or hung (SIGSTOP) while it holds a document batch."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from service_helpers import assert_every_batch_trained_once, events, step_rows, tiny_config
from services.broker import Broker
from services.orchestrator import run
from services.redis_server import connect
from services.role import member_info
from services.streams import DOCUMENTS, ROLLOUT_GROUP

pytestmark = pytest.mark.slow


class WorkerSignaller:
    """Sends `sig` to the process of a rollout worker while it holds a document batch (retrying on
    later batches when an acknowledgement slips in first)."""

    def __init__(self, broker: Broker, sig: int) -> None:
        self.broker, self.sig = broker, sig
        self.stream_key = broker.key("stream", DOCUMENTS)
        self.caught: dict = {}  # the worker signalled while holding a batch: consumer, entries held
        self.signalled: list[tuple[str, int]] = []  # every (consumer, pid) signalled
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "WorkerSignaller":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join(timeout=5)

    def _pending(self, consumer: str | None = None) -> list[dict]:
        try:
            return self.broker.client.xpending_range(self.stream_key, ROLLOUT_GROUP, "-", "+", 10,
                                                     consumername=consumer)
        except Exception:  # the group does not exist yet
            return []

    def _watch(self) -> None:
        while not self.done.is_set() and not self.caught:
            for row in self._pending():
                consumer = row["consumer"].decode()
                pid = member_info(self.broker, consumer).get("pid")
                if pid is None:
                    continue
                os.kill(int(pid), self.sig)
                self.signalled.append((consumer, int(pid)))
                # It can no longer acknowledge anything: does it still hold the batch?
                held = self._pending(consumer)
                if held:
                    self.caught.update(consumer=consumer, entries=len(held))
                break
            time.sleep(0.002)


def process_state(pid: int) -> str | None:
    """The state letter in /proc/<pid>/stat (T: stopped), None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def heavy_config(tmp_path: Path, *overrides: str):
    # Heavier rollouts than the default tiny config: a wider window to catch a worker mid-batch.
    return tiny_config(tmp_path, "train.batch_size=4", "data.seq_len=384", "refine.num_chunks=8",
                       "refine.num_samples=4", *overrides)


def test_killed_rollout_worker_is_replaced_and_its_batch_reclaimed(ray_session, redis_url: str,
                                                                   tmp_path: Path) -> None:
    config = heavy_config(tmp_path, "train.steps=10")
    with WorkerSignaller(Broker(connect(redis_url), config.service.namespace), signal.SIGKILL) as killer:
        stats = run(config, progress=False, redis_url=redis_url)
    assert killer.caught, "no rollout worker was caught holding a batch"
    rows = step_rows(tmp_path / "run")
    assert_every_batch_trained_once(rows, config)
    assert stats["step"] == config.train.steps
    # Every killed worker was replaced; the one caught holding a batch had it released at once
    # (not only after the idle timeout) and another consumer finished it (the cursors above).
    restarts = {event["member"]: event for event in events(tmp_path / "run", "restart")}
    assert sorted(restarts) == sorted(consumer for consumer, _ in killer.signalled)
    assert restarts[killer.caught["consumer"]]["released_entries"] == killer.caught["entries"]
    # The killed workers' discovery files went with them; every other member removed its own.
    assert list(Path(config.service.metrics_discovery_dir).glob("*.json")) == []


def test_hung_rollout_worker_is_replaced_after_its_heartbeat_stops(ray_session, redis_url: str,
                                                                   tmp_path: Path) -> None:
    # SIGSTOP: the process lives on (Ray sees nothing wrong) but its heartbeat thread stops too.
    config = heavy_config(tmp_path, "train.steps=6", "service.heartbeat_timeout_s=3")
    try:
        with WorkerSignaller(Broker(connect(redis_url), config.service.namespace), signal.SIGSTOP) as stopper:
            stats = run(config, progress=False, redis_url=redis_url)
    finally:
        for _, pid in stopper.signalled:  # never leave a stopped process behind
            if process_state(pid) == "T":  # still our stopped worker (not a reused pid)
                os.kill(pid, signal.SIGKILL)
    assert stopper.caught, "no rollout worker was caught holding a batch"
    assert_every_batch_trained_once(step_rows(tmp_path / "run"), config)
    assert stats["step"] == config.train.steps
    restarts = {event["member"]: event for event in events(tmp_path / "run", "restart")}
    hung = restarts[stopper.caught["consumer"]]
    assert hung["reason"].startswith("no heartbeat")
    assert hung["released_entries"] == stopper.caught["entries"]
