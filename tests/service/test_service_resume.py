"""Fault: the run is stopped (as on Ctrl-C) and resumed from the learner's checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service_helpers import run_in_background, step_rows, tiny_config
from services.broker import Broker
from services.orchestrator import run
from services.progress import read_progress
from services.redis_server import EmbeddedRedis, connect

pytestmark = pytest.mark.slow


def test_stopped_learner_resumes_exactly(ray_session, tmp_path: Path) -> None:
    steps = 5
    # Six documents: the stream wraps around, so the resumed run must also count passes right.
    reference = tiny_config(tmp_path / "a", f"train.steps={steps}", "train.checkpoint_every=0", "data.num_documents=6")
    run(reference, progress=False)
    uninterrupted = {row["step"]: row for row in step_rows(tmp_path / "a" / "run")}

    config = tiny_config(tmp_path / "b", f"train.steps={steps}", "train.checkpoint_every=0", "data.num_documents=6")
    redis_server = EmbeddedRedis().start()
    try:
        broker = Broker(connect(redis_server.url), config.service.namespace)
        thread, outcome = run_in_background(config, redis_url=redis_server.url)
        while thread.is_alive():  # stop the run (as Ctrl-C does) once the learner took two steps
            progress = read_progress(broker)
            if progress is not None and progress.step >= 2:
                broker.request_stop("test")
                break
            time.sleep(0.005)
        thread.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
    finally:
        redis_server.stop()
    stopped_at = outcome["stats"]["step"]
    assert 2 <= stopped_at < steps, "the stop landed after the last step: nothing left to resume"
    assert len(step_rows(tmp_path / "b" / "run")) == stopped_at

    stats = run(config, resume=True, progress=False)
    rows = step_rows(tmp_path / "b" / "run")
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert stats["step"] == steps
    for row in rows:
        # Same documents, same rollouts (seeded per batch), same weights and optimizer state.
        same = uninterrupted[row["step"]]
        assert (row["data_epoch"], row["cursor"]) == (same["data_epoch"], same["cursor"])
        assert row["loss"] == same["loss"], f"step {row['step']}"
        assert row["reward_mean"] == same["reward_mean"]
