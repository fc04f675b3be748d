"""Learner checkpoints: `refine.checkpoints.save_checkpoint` (model, optimizer, RNG, data cursor) plus the
service's own state in `learner_state.json` (weight version, counters, the cursor's epoch), and in
`reports.jsonl` the learner's reports the orchestrator had not confirmed writing yet (services/progress.py).

A checkpoint is written into a fresh directory and then swapped in for `latest`
(`refine.checkpoints.save_run_checkpoint`), so a learner killed while writing leaves the previous checkpoint
intact. The orchestrator reads only the small JSON file to know where the data stream resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refine.checkpoints import RunPosition, latest_checkpoint, load_checkpoint, read_trainer_state, save_run_checkpoint
from refine.errors import validation_problems
from refine.models import FastWeightLM
from refine.tokenizer import Tokenizer
from services.progress import StepReport

__all__ = ["LearnerState", "latest_checkpoint", "load_learner_checkpoint", "read_checkpoint_reports",
           "read_learner_state", "save_learner_checkpoint"]

STATE_FILE = "learner_state.json"
REPORTS_FILE = "reports.jsonl"


class LearnerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int = Field(0, ge=0)
    cursor: int = Field(0, ge=0, description="the data cursor after the last batch of the unbroken run of "
                        "finished (trained or dropped) batches (see services.messages.DataCursor.offset)")
    epoch: int = Field(0, ge=0)
    weight_version: int = Field(0, ge=0, description="policy version of the saved weights (= step)")
    dropped_stale: int = Field(0, ge=0)
    dropped_invalid: int = Field(0, ge=0, description="scored batches that did not fit their documents")
    skipped_steps: int = Field(0, ge=0)
    reports: int = Field(0, ge=0, description="reports (steps and drops) made up to this checkpoint; the "
                         "next one is numbered reports + 1")


def save_learner_checkpoint(out_dir: str | Path, model: FastWeightLM, optimizer: torch.optim.Optimizer,
                            generator: torch.Generator, tokenizer: Tokenizer, state: LearnerState,
                            reports: list[StepReport] | None = None, keep: int = 0) -> Path:
    """Save a checkpoint; `reports`: those the orchestrator may not have written yet; `keep`:
    train.keep_checkpoints (see refine.checkpoints.save_run_checkpoint)."""
    position = RunPosition(state.step, state.cursor, state.skipped_steps)
    extra = {STATE_FILE: state.model_dump_json(indent=2),
             REPORTS_FILE: "".join(report.model_dump_json() + "\n" for report in reports or [])}
    return save_run_checkpoint(out_dir, model, optimizer, position, generator, tokenizer, extra_files=extra,
                               keep=keep)


def read_learner_state(path: str | Path) -> LearnerState:
    """The service state of checkpoint directory `path` (a plain `refine train --local` checkpoint
    has none: its step and cursor are then read from trainer.pt)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if state_file.exists():
        try:
            return LearnerState.model_validate_json(state_file.read_bytes())
        except ValidationError as error:  # pydantic's report is many lines and names no file
            raise ValueError(f"{state_file}: not a readable learner state "
                             f"({'; '.join(validation_problems(error, 'the file'))})") from None
    trainer = read_trainer_state(path / "trainer.pt")  # a damaged file: one error naming it, no unsafe advice
    step = int(trainer["step"])
    return LearnerState(step=step, cursor=int(trainer["cursor"]), weight_version=step)


def read_checkpoint_reports(path: str | Path) -> list[StepReport]:
    """The reports checkpoint directory `path` keeps (none for a checkpoint without the file)."""
    reports_file = Path(path) / REPORTS_FILE
    if not reports_file.exists():
        return []
    reports = []
    for number, line in enumerate(reports_file.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            reports.append(_read_report(line))
        except ValueError as error:  # bad JSON or a report StepReport refuses: name the file and the line
            problems = (validation_problems(error, "the line") if isinstance(error, ValidationError)
                        else [str(error)])
            raise ValueError(f"{reports_file} line {number}: not a readable report ({'; '.join(problems)})") from None
    return reports


def _read_report(line: str) -> StepReport:
    """One reports.jsonl line. Learners before finite_stats (refine/loop.py) wrote a skipped step's inf or
    nan stats as null, which StepReport refuses: those stats are left out, as the learner now leaves them."""
    row = json.loads(line)
    stats = row.get("stats") if isinstance(row, dict) else None
    if isinstance(stats, dict) and None in stats.values():
        row["stats"] = {key: value for key, value in stats.items() if value is not None}
        line = json.dumps(row)
    return StepReport.model_validate_json(line)


def load_learner_checkpoint(path: str | Path, model: FastWeightLM, optimizer: torch.optim.Optimizer,
                            generator: torch.Generator) -> LearnerState:
    position = load_checkpoint(Path(path), model, optimizer, generator)
    state = read_learner_state(path)
    if (state.step, state.cursor) != (position.step, position.cursor):
        raise ValueError(f"checkpoint {path}: {STATE_FILE} says step={state.step} cursor={state.cursor}, "
                         f"trainer.pt says step={position.step} cursor={position.cursor}")
    return state
