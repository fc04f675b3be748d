"""A service run's report files, metrics.jsonl and events.jsonl: which learner reports get a row, and how both are
brought to the checkpoint a run starts from."""

from __future__ import annotations

from pathlib import Path

from learner.checkpoint import read_checkpoint_reports
from refine.config import TrainConfig
from refine.run_files import jsonl_rows, keep_rows, write_row
from services.progress import StepReport

__all__ = ["event_row", "logged", "restart_events", "restore_reports"]


def logged(train: TrainConfig, report: StepReport) -> bool:
    """Whether a step's report gets a metrics.jsonl row: every train.log_every steps, the last, and those that
    measured the held-out loss."""
    return train.logs_step(report.step) or "eval_ntp_loss" in report.stats


def event_row(report: StepReport, at: float) -> dict:
    """The events.jsonl row of a learner report that is no step (a dropped batch)."""
    return {"time": round(at, 3), "event": report.kind, "step": report.step, "report": report.seq, **report.stats}


def restart_events(path: Path, step: int, reports: int) -> None:
    """events.jsonl for a run starting at `step`, from a checkpoint made after `reports` learner reports:
    emptied for a fresh run (0); for a resumed one, the events of learner reports made after the checkpoint
    removed (the learner redoes that work: they would appear twice) and the rest (restarts) kept. The rule of
    metrics.jsonl (refine.run_files.restart_metrics), by report number: a batch dropped at step `step` may come
    before or after that step's checkpoint. See refine.run_files.keep_rows."""

    def before_the_checkpoint(row: dict) -> bool:
        number = row.get("report")
        if isinstance(number, int):
            return number <= reports
        # Written before reports were numbered.
        return not (row.get("event") == "dropped" and row.get("step", 0) > step)

    keep_rows(path, before_the_checkpoint if step > 0 or reports > 0 else None)


def restore_reports(checkpoint: Path, out_dir: Path, train: TrainConfig) -> int:
    """Append the learner reports `checkpoint` kept that metrics.jsonl (the steps `train` logs) and events.jsonl
    lack (a driver that died between the learner's checkpoint and writing its reports); returns how many."""
    reports = read_checkpoint_reports(checkpoint)
    steps = {row.get("step") for _, row in jsonl_rows(out_dir / "metrics.jsonl")}
    numbered = {row.get("report") for _, row in jsonl_rows(out_dir / "events.jsonl")}
    restored = 0
    for report in sorted(reports, key=lambda report: report.seq):
        if report.kind == "step" and report.step not in steps and logged(train, report):
            write_row(out_dir / "metrics.jsonl", report.stats, "refine")
        elif report.kind != "step" and report.seq not in numbered:
            write_row(out_dir / "events.jsonl", event_row(report, report.created_at), "refine")
        else:
            continue
        restored += 1
    return restored
