"""A run's report files brought to its checkpoint (services.report_files): events.jsonl on resume."""

from __future__ import annotations

import json
from pathlib import Path

from services.report_files import restart_events


def _event(number: int | None, step: int, event: str = "dropped") -> str:
    row = {"time": 1.0, "event": event, "step": step} | ({"report": number} if number is not None else {})
    return json.dumps(row) + "\n"


def test_events_of_reports_after_the_checkpoint_are_removed_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    restart = json.dumps({"time": 1.0, "event": "restart", "member": "rollout_worker-0.0"}) + "\n"
    # Checkpoint at step 4 after 5 reports: a batch dropped at step 4 came before (report 5) or after it (6).
    path.write_text(_event(2, 1) + restart + _event(5, 4) + _event(6, 4) + _event(None, 7) + "{cut sh")
    restart_events(path, step=4, reports=5)
    assert path.read_text() == _event(2, 1) + restart + _event(5, 4)
    restart_events(path, step=0, reports=0)  # a fresh run
    assert path.read_text() == ""
