"""What the learner tells the orchestrator: one report per finished batch, and a progress record.

Reports go through the `learner_reports` stream (the orchestrator writes them to metrics.jsonl and
the progress bar), so the learner may run on any node while the orchestrator owns the run
directory. The progress record is a small hash the orchestrator polls to pace document batches.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.broker import Broker
from services.messages import Message

__all__ = ["LearnerProgress", "StepReport", "read_progress", "write_progress"]

StatValue = float | int | str


class StepReport(Message):
    """The learner finished a batch: trained on it ("step") or dropped it ("dropped")."""

    kind: Literal["step", "dropped"]
    step: int = Field(ge=0, description="optimizer steps taken so far, this one included")
    stats: dict[str, StatValue] = Field(default_factory=dict)


class LearnerProgress(BaseModel):
    """Learner state the orchestrator paces itself by."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(0, ge=0, description="optimizer steps taken")
    finished: int = Field(0, ge=0, description="batches trained, dropped or rejected since the learner started")
    weight_version: int = Field(-1, ge=-1, description="last published weight version; -1 before the first")
    done: bool = False


def _key(broker: Broker) -> str:
    return broker.key("learner", "progress")


def write_progress(broker: Broker, progress: LearnerProgress) -> None:
    broker.client.hset(_key(broker), mapping={name: str(int(value)) for name, value in progress.model_dump().items()})


def read_progress(broker: Broker) -> LearnerProgress | None:
    """The learner's last record, or None before it wrote one."""
    raw = broker.client.hgetall(_key(broker))
    if not raw:
        return None
    fields = {key.decode(): int(value) for key, value in raw.items()}
    return LearnerProgress(**fields)
