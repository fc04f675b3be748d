"""The service's stream helpers on a real Redis (no Ray): handing over a dead consumer's entries,
keeping a busy consumer's entries from being taken over, trimming what every group acknowledged,
progress records, the data position across passes; the learner's resume point over batches that
finish out of order, and its check of scored batches against their documents."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from learner.checkpoint import read_learner_state
from learner.learner import Learner, ResumePoint
from service_helpers import tiny_config, wait_for
from services.broker import Broker
from services.codec import decode, encode
from services.messages import DataCursor, DocumentBatch, ScoredBatch
from services.progress import LearnerProgress, StepReport, read_progress, write_progress
from services.redis_server import connect
from services.role import RoleRuntime
from services.streams import (
    LEARNER_GROUP, LEARNER_REPORTS, SCORED, DocumentStore, document_batch_id_for, document_batch_index,
    CONSUMED_KEY, DROPPED_KEY, delete_idle_consumers, make_run_streams, release_consumer, rollout_batch_id_for,
    trim_acknowledged,
)


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


def test_replaced_consumers_are_deleted_once_they_hold_nothing(broker: Broker) -> None:
    for index in range(2):
        broker.publish("documents", document_batch(index))
    (held,) = broker.consume("documents", "rollout", "worker-0.0", DocumentBatch, count=1)
    broker.consume("documents", "rollout", "worker-1.0", DocumentBatch, count=1)

    def names() -> set[str]:
        return {c["name"].decode() for c in broker.client.xinfo_consumers(broker.key("stream", "documents"), "rollout")}

    # worker-0.0 was replaced by worker-0.1 but still holds an entry: deleting it would lose that entry.
    assert delete_idle_consumers(broker, "documents", "rollout", keep={"worker-0.1", "worker-1.0"}) == []
    release_consumer(broker, "documents", "rollout", "worker-0.0")
    taken = broker.reclaim("documents", "rollout", "worker-0.1", DocumentBatch, min_idle_ms=60_000)
    assert [entry for entry, _ in taken] == [held[0]]
    assert delete_idle_consumers(broker, "documents", "rollout", keep={"worker-0.1", "worker-1.0"}) == ["worker-0.0"]
    assert names() == {"worker-0.1", "worker-1.0"}
    assert delete_idle_consumers(broker, "no-such-stream", "rollout", keep=set()) == []


def test_a_replaced_consumer_that_reads_while_it_is_deleted_keeps_its_entry(broker: Broker, redis_url: str) -> None:
    """A replaced worker, killed but still running, can read an entry just as the orchestrator deletes its idle
    consumer. Checking that it holds nothing and deleting it are one step, so the entry it read stays pending
    (a survivor takes it over) instead of being dropped with the consumer, never to be redelivered."""
    stream, group = "documents", "rollout"
    broker.publish(stream, document_batch(0))
    ((done, _),) = broker.consume(stream, group, "worker-0.0", DocumentBatch, count=1)
    broker.ack(stream, group, [done])  # a consumer of the group that holds nothing
    broker.publish(stream, document_batch(1))
    read: list[str] = []

    def late_read() -> None:
        if not read:
            read.extend(entry for entry, _ in broker.consume(stream, group, "worker-0.0", DocumentBatch, count=1))

    class ReadsRightAfterTheCheck(redis.Redis):
        def xinfo_consumers(self, *args, **kwargs):  # a check made apart from the deletion lets the read in between
            consumers = super().xinfo_consumers(*args, **kwargs)
            late_read()
            return consumers

    cleaner = Broker(ReadsRightAfterTheCheck.from_url(redis_url), broker.namespace)
    delete_idle_consumers(cleaner, stream, group, keep={"worker-0.1"})
    late_read()  # the read comes after the deletion instead: it registers the consumer anew
    assert len(read) == 1
    pending = broker.client.xpending_range(broker.key("stream", stream), group, "-", "+", 10)
    assert [row["message_id"].decode() for row in pending] == read
    release_consumer(broker, stream, group, "worker-0.0")
    taken = broker.reclaim(stream, group, "worker-0.1", DocumentBatch, min_idle_ms=60_000)
    assert [entry for entry, _ in taken] == read


def _owner_and_deliveries(broker: Broker, entry_id: str) -> tuple[str, int]:
    (row,) = broker.client.xpending_range(broker.key("stream", "documents"), "rollout", entry_id, entry_id, 1)
    return row["consumer"].decode(), int(row["times_delivered"])


def _idle_ms(broker: Broker, entry_id: str) -> int:
    (row,) = broker.client.xpending_range(broker.key("stream", "documents"), "rollout", entry_id, entry_id, 1)
    return int(row["time_since_delivered"])


def _age(broker: Broker, entry_id: str, idle_ms: int) -> None:
    """Make a pending entry look idle for `idle_ms`, as if its owner had gone silent that long ago: XCLAIM
    to its own owner with IDLE (JUSTID leaves its delivery count alone). No waiting for the clock."""
    owner, _ = _owner_and_deliveries(broker, entry_id)
    broker.client.xclaim(broker.key("stream", "documents"), "rollout", owner, 0, [entry_id], idle=idle_ms,
                         justid=True)


def _beats_passed(broker: Broker, role: str, member_id: str, beats: int) -> None:
    """Wait until `member_id` has heartbeat `beats` more times: a beat is followed by that round's keep-alives,
    so after two new beats a whole round of keep-alives began (and ended) after this call started."""
    key = broker.key("heartbeat", role)
    last = broker.client.zscore(key, member_id)
    for _ in range(beats):
        seen = last
        wait_for(lambda: (broker.client.zscore(key, member_id) or 0) > seen, f"a heartbeat of {member_id}",
                 timeout_s=30.0)
        last = broker.client.zscore(key, member_id)


IDLE_MS = 60_000  # the reclaim threshold: entries are aged past it, never waited for


def test_an_entry_its_live_consumer_keeps_alive_is_not_reclaimed(broker: Broker, redis_url: str) -> None:
    """A busy worker's heartbeat thread keeps its entry fresh: idle workers reclaiming after the idle
    time take only the silent consumer's entry, and the busy entry's delivery count stays 1."""
    for index in range(2):
        broker.publish("documents", document_batch(index))
    runtime = RoleRuntime("rollout_worker", "busy", redis_url, broker.namespace, None, heartbeat_interval_s=0.1,
                          threads=torch.get_num_threads())
    try:
        ((busy_entry, _),) = broker.consume("documents", "rollout", "busy", DocumentBatch)
        ((silent_entry, _),) = broker.consume("documents", "rollout", "silent", DocumentBatch)
        with runtime.holding("documents", "rollout", busy_entry):
            taken: list[str] = []
            for worker in ("idle-a", "idle-b", "idle-c", "idle-d"):  # idle workers polling, past the idle time
                # Both entries last touched long past the idle time: the silent one stays so, the held one is
                # brought back by its worker's next heartbeat (the keep-alive under test) before the poll.
                _age(broker, silent_entry, 2 * IDLE_MS)
                _age(broker, busy_entry, 2 * IDLE_MS)
                wait_for(lambda: _idle_ms(broker, busy_entry) < IDLE_MS, "the held entry kept alive", timeout_s=30.0)
                taken += [entry_id for entry_id, _ in broker.reclaim("documents", "rollout", worker, DocumentBatch,
                                                                     min_idle_ms=IDLE_MS, max_deliveries=5)]
            assert taken == [silent_entry] * 4  # taken over again and again: nobody keeps it alive
            assert _owner_and_deliveries(broker, silent_entry) == ("idle-d", 5)
            assert _owner_and_deliveries(broker, busy_entry) == ("busy", 1)
        assert broker.dead_letters("documents") == []
        broker.ack("documents", "rollout", [silent_entry])  # whoever took it over finished it
        # Done holding it (as if its worker had died): once a keep-alive round that may have started before
        # the release is over, the entry ages like any other and the heartbeats no longer refresh it ...
        _beats_passed(broker, "rollout_worker", "busy", beats=2)
        _age(broker, busy_entry, 2 * IDLE_MS)
        _beats_passed(broker, "rollout_worker", "busy", beats=2)
        assert _idle_ms(broker, busy_entry) >= 2 * IDLE_MS
        # ... so it is reclaimable again ...
        reclaimed = broker.reclaim("documents", "rollout", "idle-a", DocumentBatch, min_idle_ms=IDLE_MS)
        assert [entry_id for entry_id, _ in reclaimed] == [busy_entry]
        # ... and a late keep-alive of the old owner does not pull it back.
        assert broker.keep_alive("documents", "rollout", "busy", [busy_entry]) == 0
        assert _owner_and_deliveries(broker, busy_entry) == ("idle-a", 2)
    finally:
        runtime.close()


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


def test_resume_point_moves_only_through_finished_batches_in_order() -> None:
    """Batches finish out of order with several in flight: the checkpoint's cursor never passes a
    batch that has not finished, or a resume would skip it."""
    point = ResumePoint(epoch=0, cursor=6)  # resumed: the run's first batch (docs-0) starts after 6
    point.finished(1, DataCursor(epoch=0, offset=10))
    assert (point.epoch, point.cursor) == (0, 6)  # docs-0 not finished: resume must read it again
    point.finished(0, DataCursor(epoch=0, offset=8))
    assert (point.epoch, point.cursor) == (0, 10)  # the gap closed: through docs-1
    point.finished(3, DataCursor(epoch=1, offset=2))
    point.finished(2, None)  # finished, its documents unknown (dropped as missing)
    assert (point.epoch, point.cursor, point.next_index) == (1, 2, 4)  # across the end of a pass too
    point.finished(1, DataCursor(epoch=0, offset=10))  # counted already: changes nothing
    assert (point.epoch, point.cursor, point.next_index, point.ahead) == (1, 2, 4, {})
    assert document_batch_index(document_batch_id_for(12)) == 12
    assert document_batch_index("docs-x") is None and document_batch_index("a1b2c3") is None


# -- the learner against a real Redis: out-of-order batches, batches that do not fit their documents --

DOCS_T, ROLLOUT_K, CHUNKS, SAMPLES = 64, 5, 4, 2


@pytest.fixture
def learner(redis_url: str, tmp_path: Path) -> Iterator[Learner]:
    config = tiny_config(tmp_path, "train.checkpoint_every=0", f"refine.rollout_len={ROLLOUT_K}")
    learner = Learner(config.model_dump_json(), redis_url, config.service.namespace)
    make_run_streams(learner.broker, colocated=False)  # as the driver does before any role starts
    yield learner
    learner.runtime.close()
    Broker(connect(redis_url), config.service.namespace).delete_namespace()


def _documents(index: int, batch_size: int = 2) -> DocumentBatch:
    generator = torch.Generator().manual_seed(index)
    return DocumentBatch(batch_id=document_batch_id_for(index), doc_ids=[f"d{index}.{b}" for b in range(batch_size)],
                         token_ids=torch.randint(0, 256, (batch_size, DOCS_T), generator=generator),
                         lengths=torch.full((batch_size,), DOCS_T), cursor=DataCursor(epoch=0, offset=2 * (index + 1)))


def _scored(documents: DocumentBatch, policy_version: int, positions: torch.Tensor | None = None) -> ScoredBatch:
    """Rollouts of `documents` as a worker and a reward replica would send them."""
    if positions is None:
        positions = torch.tensor([[10, 20, 30, 40]] * documents.batch_size)
    rows = positions.numel() * SAMPLES
    generator = torch.Generator().manual_seed(rows)
    return ScoredBatch(
        rollout_batch_id=rollout_batch_id_for(documents.batch_id), document_batch_id=documents.batch_id,
        policy_version=policy_version, worker_id="rollout_worker-0.0", num_samples=SAMPLES, rollout_len=ROLLOUT_K,
        positions=positions, entropies=torch.ones(positions.shape),
        rollout_tokens=torch.randint(0, 256, (rows, ROLLOUT_K), generator=generator),
        behaviour_logprobs=torch.full((rows, ROLLOUT_K), -5.5), rewards=torch.randn(rows, generator=generator),
        reward_type="cosine",
    )


def _deliver(learner: Learner, documents: DocumentBatch, scored: ScoredBatch) -> None:
    """The orchestrator stored the documents, the reward replica published the scores: one learner read."""
    learner.documents.put(documents)
    learner.broker.publish(SCORED, scored)
    assert learner.run_once(block_ms=100) == 1


def _reports(learner: Learner) -> list[StepReport]:
    return [report for _, report in learner.broker.consume(LEARNER_REPORTS, "test", "test", StepReport, count=100)]


def test_learner_checkpoint_cursor_waits_for_a_batch_trained_out_of_order(learner: Learner) -> None:
    docs = [_documents(index) for index in range(4)]
    _deliver(learner, docs[1], _scored(docs[1], policy_version=0))
    assert (learner.state.step, learner.state.cursor) == (1, 0)  # docs-0 not trained: a resume must read it
    _deliver(learner, docs[0], _scored(docs[0], policy_version=1))
    assert (learner.state.step, learner.state.cursor) == (2, docs[1].cursor.offset)
    _deliver(learner, docs[3], _scored(docs[3], policy_version=0))  # too stale: dropped, and finished
    _deliver(learner, docs[2], _scored(docs[2], policy_version=2))
    assert (learner.state.step, learner.state.dropped_stale, learner.state.cursor) == (3, 1, docs[3].cursor.offset)
    assert learner.metrics.registry.get_sample_value("refine_learner_step") == 3
    learner.checkpoint()
    assert read_learner_state(learner.out_dir / "checkpoints" / "latest").cursor == docs[3].cursor.offset


def test_learner_exactly_once_records_stay_small_and_redeliveries_are_still_caught(learner: Learner) -> None:
    """A long run must not keep one consumed-set member per step: batches below the unbroken run of
    finished ones are recognized by their index, and their records go."""
    docs = [_documents(index) for index in range(3)]
    scored = [_scored(doc, policy_version=0) for doc in docs]
    _deliver(learner, docs[1], scored[1])  # past a gap: kept in the set until docs-0 finishes
    assert learner.broker.consumed_count(CONSUMED_KEY) == 1
    _deliver(learner, docs[0], scored[0].model_copy(update={"policy_version": 1}))
    _deliver(learner, docs[2], scored[2].model_copy(update={"policy_version": 2}))
    assert learner.state.step == 3
    assert learner.broker.consumed_count(CONSUMED_KEY) == 0 and learner.broker.consumed_count(DROPPED_KEY) == 0
    learner.broker.publish(SCORED, scored[1])  # a redelivery, after a reward replica was replaced
    assert learner.run_once(block_ms=100) == 1
    assert (learner.state.step, learner.duplicates) == (3, 1)  # acknowledged, not trained again
    assert learner.broker.pending(SCORED, LEARNER_GROUP) == 0


def _short_second_document(documents: DocumentBatch) -> DocumentBatch:
    return documents.model_copy(update={"lengths": torch.tensor([DOCS_T, 30])})


def _token_past_vocabulary(scored: ScoredBatch) -> ScoredBatch:
    tokens = scored.rollout_tokens.clone()
    tokens[3, 1] = 300
    return scored.model_copy(update={"rollout_tokens": tokens})


# (documents of docs-0 -> the scored batch sent for them, the documents the learner finds, the error)
MISFITS = [
    (lambda docs: _scored(docs, 0, torch.tensor([[10, 20, 30, 40], [10, 20, 30, 60]])), lambda docs: docs,
     r"positions\[1, 3\]=60 is outside 1\.\.59 \(document length 64, rollout_len k=5\)"),
    (lambda docs: _scored(docs, 0, torch.tensor([[10, 20, 30, 40], [5, 10, 20, 26]])), _short_second_document,
     r"positions\[1, 3\]=26 is outside 1\.\.25 \(document length 30, rollout_len k=5\)"),
    (lambda docs: _scored(_documents(0, batch_size=3), 0), lambda docs: docs,
     r"positions: 3 rows, but document batch 'docs-0' has 2 documents"),
    (lambda docs: _token_past_vocabulary(_scored(docs, 0)), lambda docs: docs,
     r"rollout_tokens: token id 300 is not below model.vocab_size=260"),
]


@pytest.mark.parametrize("make_batch, stored, message", MISFITS, ids=[
    "position-past-length-minus-k", "position-past-a-short-document", "batch-size-mismatch", "token-past-vocabulary"])
def test_learner_drops_a_scored_batch_that_does_not_fit_its_documents(learner: Learner, make_batch, stored,
                                                                       message: str) -> None:
    documents = _documents(0)
    bad = make_batch(documents)
    documents = stored(documents)
    _deliver(learner, documents, bad)
    assert learner.state.step == 0  # not trained on, and the learner did not crash
    assert learner.broker.pending(SCORED, LEARNER_GROUP) == 0  # acknowledged: it does not come back
    assert learner.seen(bad.rollout_batch_id, documents.batch_id)  # a redelivery would be acknowledged, not used
    assert learner.documents.get(documents.batch_id) is None
    (report,) = _reports(learner)  # what the orchestrator writes to events.jsonl
    assert (report.kind, report.stats["reason"], report.stats["dropped_invalid"]) == ("dropped", "invalid", 1)
    assert re.search(message, str(report.stats["error"])), report.stats["error"]
    # The resume point moved past it (dropped is finished), and the next batch trains as usual.
    assert learner.state.cursor == documents.cursor.offset
    good = _documents(1)
    _deliver(learner, good, _scored(good, policy_version=0))
    assert (learner.state.step, learner.state.cursor) == (1, good.cursor.offset)
    # The count is part of the checkpoint, so a resumed run keeps reporting it.
    learner.checkpoint()
    assert read_learner_state(learner.out_dir / "checkpoints" / "latest").dropped_invalid == 1
