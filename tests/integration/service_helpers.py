"""Configs, run-directory readers and checks shared by the service tests."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from refine.config import RunConfig, load_config
from refine.data.stream import DataPosition, document_batches
from refine.tokenizer import load_tokenizer
from services.orchestrator import run

REPO = Path(__file__).resolve().parents[2]
SERVICE_TINY = REPO / "configs" / "service_tiny.yaml"


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Run directory, metrics discovery and Redis namespace private to one test."""
    return [
        f"train.out_dir={tmp_path / 'run'}",
        f"service.metrics_discovery_dir={tmp_path / 'prometheus'}",
        f"service.namespace=test-{uuid.uuid4().hex[:10]}",
    ]


def tiny_config(tmp_path: Path, *overrides: str) -> RunConfig:
    """configs/service_tiny.yaml for one test, with extra `section.field=value` overrides."""
    return load_config(SERVICE_TINY, [*tiny_overrides(tmp_path), *overrides])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl: one row per optimizer step."""
    return _jsonl(run_dir / "metrics.jsonl")


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    """events.jsonl rows (dropped batches, restarted roles), of one kind if given."""
    return [row for row in _jsonl(run_dir / "events.jsonl") if kind is None or row["event"] == kind]


def run_in_background(config: RunConfig, **kwargs) -> tuple[threading.Thread, dict]:
    """`run(config)` on a thread; the dict gets "stats" or "error"."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["stats"] = run(config, progress=False, **kwargs)
        except BaseException as exc:  # reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="orchestrator")
    thread.start()
    return thread, outcome


def stream_positions(config: RunConfig, count: int) -> list[tuple[int, int]]:
    """(pass, cursor) of the first `count` batches of the run's data stream, in order."""
    position = DataPosition(epoch=0, cursor=-1)
    batches = document_batches(config, load_tokenizer(config.tokenizer))
    positions = []
    for _ in range(count):
        batch = next(batches)
        positions.append((position.advance(batch.cursor, batch.cursors), batch.cursor))  # as the orchestrator does
    return positions


def assert_every_batch_trained_once(rows: list[dict], config: RunConfig) -> None:
    """Steps 1..steps, each on a different rollout batch, on the data stream's batches in order:
    none skipped, none repeated."""
    steps = config.train.steps
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    ids = [row["rollout_batch_id"] for row in rows]
    assert len(set(ids)) == len(ids) == steps
    assert [(row["data_epoch"], row["cursor"]) for row in rows] == stream_positions(config, steps)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float, poll_s: float = 0.01) -> None:
    """Poll `condition` every `poll_s` seconds until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(poll_s)
