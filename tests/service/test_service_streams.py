"""The service's stream helpers on a real Redis (no Ray): handing over a dead consumer's entries,
trimming what every group acknowledged, progress records, the data position across passes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

from services.broker import Broker
from services.codec import decode, encode
from services.messages import DocumentBatch
from services.orchestrator import DataPosition
from services.progress import LearnerProgress, StepReport, read_progress, write_progress
from services.redis_server import connect
from services.streams import DocumentStore, release_consumer, rollout_batch_id_for, trim_acknowledged


@pytest.fixture
def broker(redis_url: str) -> Iterator[Broker]:
    broker = Broker(connect(redis_url), f"test-{uuid.uuid4().hex[:10]}")
    yield broker
    broker.delete_namespace()


def document_batch(index: int) -> DocumentBatch:
    return DocumentBatch(batch_id=f"docs-{index}", doc_ids=[f"d{index}"], token_ids=torch.full((1, 8), index),
                         lengths=torch.tensor([8]))


def test_released_entries_of_a_dead_consumer_are_reclaimed_at_once(broker: Broker) -> None:
    for index in range(3):
        broker.publish("documents", document_batch(index))
    dead = broker.consume("documents", "rollout", "dead", DocumentBatch, count=2)
    alive = broker.consume("documents", "rollout", "alive", DocumentBatch, count=1)
    # Fresh entries are not reclaimable under a long idle threshold ...
    assert broker.reclaim("documents", "rollout", "other", DocumentBatch, min_idle_ms=60_000) == []
    assert release_consumer(broker, "documents", "rollout", "dead") == 2
    # ... released ones are, and only those: the live consumer keeps its entry.
    taken = broker.reclaim("documents", "rollout", "other", DocumentBatch, min_idle_ms=60_000)
    assert sorted(batch.batch_id for _, batch in taken) == sorted(batch.batch_id for _, batch in dead)
    assert alive[0][1].batch_id not in {batch.batch_id for _, batch in taken}
    assert release_consumer(broker, "documents", "rollout", "dead") == 0
    assert release_consumer(broker, "no-such-stream", "rollout", "dead") == 0


def test_trim_keeps_pending_and_undelivered_entries(broker: Broker) -> None:
    ids = [broker.publish("documents", document_batch(index)) for index in range(5)]
    delivered = broker.consume("documents", "rollout", "worker", DocumentBatch, count=3)
    broker.ack("documents", "rollout", [entry_id for entry_id, _ in delivered[:2]])
    broker.ensure_group("documents", "learner")  # a second group that has read nothing yet
    assert trim_acknowledged(broker, "documents") == 0
    broker.consume("documents", "learner", "learner", DocumentBatch, count=5)
    broker.ack("documents", "learner", ids)
    assert trim_acknowledged(broker, "documents") == 2  # acknowledged by both groups
    assert broker.length("documents") == 3
    assert broker.pending("documents", "rollout") == 1
    remaining = broker.consume("documents", "rollout", "worker", DocumentBatch, count=5)
    assert [batch.batch_id for _, batch in remaining] == ["docs-3", "docs-4"]
    assert trim_acknowledged(broker, "no-such-stream") == 0


def test_trim_survives_entries_acknowledged_while_it_reads_the_groups(broker: Broker) -> None:
    """The orchestrator trims while consumers work: a group reported with pending entries may have
    acknowledged them all by the time trim asks which is the oldest."""
    ids = [broker.publish("documents", document_batch(index)) for index in range(3)]
    broker.consume("documents", "rollout", "worker", DocumentBatch, count=2)
    client = broker.client
    read_groups = client.xinfo_groups

    def groups_then_a_consumer_acknowledges(key):
        groups = read_groups(key)  # still says 2 pending
        broker.ack("documents", "rollout", ids[:2])  # the real consumer's acknowledgement, on the real server
        return groups

    client.xinfo_groups = groups_then_a_consumer_acknowledges
    try:
        # Acknowledged and older than the last delivered entry (which XTRIM MINID keeps): the first.
        assert trim_acknowledged(broker, "documents") == 1
    finally:
        del client.xinfo_groups  # back to the class's method
    assert broker.length("documents") == 2
    remaining = broker.consume("documents", "rollout", "worker", DocumentBatch, count=5)
    assert [batch.batch_id for _, batch in remaining] == ["docs-2"]


def test_document_store_round_trip(broker: Broker) -> None:
    store = DocumentStore(broker)
    batch = document_batch(7)
    store.put(batch)
    loaded = store.get(batch.batch_id)
    assert loaded is not None and torch.equal(loaded.token_ids, batch.token_ids)
    store.delete(batch.batch_id)
    assert store.get(batch.batch_id) is None
    assert rollout_batch_id_for("docs-7") == rollout_batch_id_for("docs-7") != rollout_batch_id_for("docs-8")


def test_progress_and_reports_round_trip(broker: Broker) -> None:
    assert read_progress(broker) is None
    write_progress(broker, LearnerProgress(step=3, finished=4, weight_version=3, done=True))
    assert read_progress(broker) == LearnerProgress(step=3, finished=4, weight_version=3, done=True)
    report = StepReport(kind="step", step=3, stats={"loss": 1.5, "step": 3, "worker_id": "rollout_worker-0.0"})
    assert decode(encode(report), StepReport).stats == report.stats


def test_data_position_counts_passes() -> None:
    position = DataPosition(epoch=0, cursor=-1)
    cursors = [position.advance(cursor, "synthetic") for cursor in (2, 4, 0, 2, 1, 1)]
    assert [(c.epoch, c.offset) for c in cursors] == [(0, 2), (0, 4), (1, 0), (1, 2), (2, 1), (3, 1)]
    resumed = DataPosition(epoch=1, cursor=0)  # a checkpoint taken after the batch that ended pass 0
    assert (resumed.advance(2, "synthetic").epoch, resumed.cursor) == (1, 2)
