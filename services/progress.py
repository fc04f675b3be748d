"""What the learner tells the orchestrator: one report per finished batch, and a progress record.

Reports go through the `learner_reports` stream (the orchestrator writes them to metrics.jsonl and
the progress bar), so the learner may run on any node while the orchestrator owns the run
directory. The progress record is a small hash the orchestrator polls to pace document batches.

Reports are numbered through the whole run (`seq`, continued from the checkpoint on resume). The
orchestrator confirms, under `recorded`, the number up to which it has written every report; the
learner keeps the reports after that number in its checkpoints, so a driver that died before writing
them loses none (services/report_files.py restores them on resume).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.broker import Broker
from services.messages import Message

__all__ = ["LearnerProgress", "StepReport", "read_progress", "read_recorded", "write_progress", "write_recorded"]

StatValue = float | int | str


class StepReport(Message):
    """The learner finished a batch: trained on it ("step") or dropped it ("dropped")."""

    kind: Literal["step", "dropped"]
    step: int = Field(ge=0, description="learner steps taken so far, this one included: a step trains one batch "
                      "(`train.mini_batches` optimizer steps) and is one metrics.jsonl row")
    seq: int = Field(0, ge=0, description="the report's number in the run: 1, 2, ... (0: unnumbered)")
    stats: dict[str, StatValue] = Field(default_factory=dict)


class LearnerProgress(BaseModel):
    """Learner state the orchestrator paces itself by."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(0, ge=0, description="learner steps taken: rollout batches trained, each "
                      "`train.mini_batches` optimizer steps")
    finished: int = Field(0, ge=0, description="batches trained, dropped or rejected since the learner started")
    unbroken: int = Field(0, ge=0, description="the run's batches finished (trained or dropped) in an unbroken run "
                          "from its first, in publish order: the checkpoint's data cursor stands after the last")
    weight_version: int = Field(-1, ge=-1, description="last published weight version; -1 before the first")
    done: bool = False


def _key(broker: Broker) -> str:
    return broker.key("learner", "progress")


def write_progress(broker: Broker, progress: LearnerProgress) -> None:
    pipe = broker.client.pipeline(transaction=True)
    pipe.hset(_key(broker), mapping={name: str(int(value)) for name, value in progress.model_dump().items()})
    broker.expire_with(pipe, _key(broker))
    pipe.execute()


def read_progress(broker: Broker) -> LearnerProgress | None:
    """The learner's last record, or None before it wrote one."""
    raw = broker.client.hgetall(_key(broker))
    if not raw:
        return None
    fields = {key.decode(): int(value) for key, value in raw.items()}
    return LearnerProgress(**fields)


def _published_key(broker: Broker) -> str:
    return broker.key("orchestrator", "published")


def write_published(broker: Broker, count: int) -> None:
    """The orchestrator has issued document batches docs-0 .. docs-(count - 1) (written before each is published)."""
    broker.set_value(_published_key(broker), str(count))


def read_published(broker: Broker) -> int | None:
    """How many document batches the orchestrator has issued; None without an orchestrator (a learner driven by
    hand, in a notebook or a test)."""
    raw = broker.client.get(_published_key(broker))
    return int(raw) if raw is not None else None


def _recorded_key(broker: Broker) -> str:
    return broker.key("orchestrator", "recorded")


def write_recorded(broker: Broker, seq: int) -> None:
    """The orchestrator has written every report numbered up to `seq`."""
    broker.set_value(_recorded_key(broker), str(seq))


def read_recorded(broker: Broker) -> int:
    """The number up to which the orchestrator has written every report (0: none confirmed yet)."""
    raw = broker.client.get(_recorded_key(broker))
    return int(raw) if raw is not None else 0
