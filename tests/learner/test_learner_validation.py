"""The learner refuses batches the service did not produce (forged or corrupt entries, a producer bug) instead of
training on them or crashing on them, with a reason naming the field and the value (real Redis, no Ray): scored
batches that break an intrinsic rule are dead-lettered when decoded, those that do not match the run's settings
or their documents are dropped and counted, and batches of document batches the orchestrator never published
are ignored without counting towards the orchestrator's pacing."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from learner.checkpoint import latest_checkpoint, read_learner_state
from learner.learner import Learner
from refine.config import load_config
from services.messages import DataCursor, DocumentBatch, ScoredBatch
from services.progress import LearnerProgress, StepReport, read_progress, write_progress, write_published
from services.resilience import RedisStateLost
from services.streams import (
    DOCUMENTS, LEARNER_GROUP, LEARNER_REPORTS, SCORED, document_batch_id_for, make_run_streams, rollout_batch_id_for,
)

SERVICE_TINY = Path(__file__).resolve().parents[2] / "configs" / "service_tiny.yaml"
# configs/service_tiny.yaml: model.vocab_size=260, refine.num_chunks=4, num_samples=2, rollout_len=5, reward cosine.
T, K, CHUNKS, SAMPLES = 64, 5, 4, 2


def _make_learner(redis_url: str, tmp_path: Path, *overrides: str) -> Learner:
    config = load_config(SERVICE_TINY, [f"train.out_dir={tmp_path / 'run'}", "train.checkpoint_every=0",
                                        f"service.namespace=test-{uuid.uuid4().hex[:10]}",
                                        f"service.metrics_discovery_dir={tmp_path / 'prometheus'}", *overrides])
    learner = Learner(config.model_dump_json(), redis_url, config.service.namespace)
    make_run_streams(learner.broker, config.service.mode == "colocated")  # as the driver does before any role starts
    return learner


@pytest.fixture
def make_learner(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Learner]]:
    learners: list[Learner] = []

    def make(*overrides: str) -> Learner:
        learner = _make_learner(redis_url, tmp_path, *overrides)
        learners.append(learner)
        return learner

    yield make
    for learner in learners:
        learner.runtime.close()
        learner.broker.delete_namespace()


@pytest.fixture
def learner(make_learner) -> Learner:
    learner = make_learner()
    learner.broker.ensure_group(SCORED, LEARNER_GROUP, start_id="0")
    return learner


def _documents(index: int, batch_id: str | None = None) -> DocumentBatch:
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(index))
    return DocumentBatch(batch_id=batch_id or document_batch_id_for(index), doc_ids=[f"d{index}.0", f"d{index}.1"],
                         token_ids=ids, lengths=torch.full((2,), T), cursor=DataCursor(epoch=0, offset=2 * (index + 1)))


def _scored(documents: DocumentBatch, samples: int = SAMPLES, k: int = K, chunks: int = CHUNKS,
            reward_type: str = "cosine") -> ScoredBatch:
    """Rollouts of `documents` as a worker and a reward replica would send them, ground truth included."""
    positions = torch.tensor([[10, 20, 30, 40, 50][:chunks]] * documents.batch_size)
    rows = positions.numel() * samples
    generator = torch.Generator().manual_seed(rows)
    starts = positions.reshape(-1)
    doc_rows = torch.arange(documents.batch_size).repeat_interleave(chunks)
    truth = documents.token_ids[doc_rows[:, None], starts[:, None] + torch.arange(k)].repeat_interleave(samples, 0)
    return ScoredBatch(
        rollout_batch_id=rollout_batch_id_for(documents.batch_id), document_batch_id=documents.batch_id,
        policy_version=0, worker_id="rollout_worker-0.0", num_samples=samples, rollout_len=k,
        positions=positions, entropies=torch.ones(positions.shape),
        rollout_tokens=torch.randint(0, 256, (rows, k), generator=generator),
        behaviour_logprobs=torch.full((rows, k), -5.5), rewards=torch.randn(rows, generator=generator),
        reward_type=reward_type, ground_truth_tokens=truth.to(torch.long),
    )


def _reports(learner: Learner) -> list[StepReport]:
    return [report for _, report in learner.broker.consume(LEARNER_REPORTS, "test", "test", StepReport, count=100)]


def _finished(learner: Learner) -> int:
    """What the orchestrator paces itself by: the batches the learner says it finished."""
    progress = read_progress(learner.broker)
    return 0 if progress is None else progress.finished


def _positive_logprob(scored: ScoredBatch) -> ScoredBatch:
    logprobs = scored.behaviour_logprobs.clone()
    logprobs[3, 2] = 0.75
    return scored.model_copy(update={"behaviour_logprobs": logprobs})  # model_copy does not validate


def _no_positions(scored: ScoredBatch) -> ScoredBatch:
    empty = {"positions": torch.zeros(2, 0, dtype=torch.long), "entropies": torch.zeros(2, 0),
             "rollout_tokens": torch.zeros(0, K, dtype=torch.long), "behaviour_logprobs": torch.zeros(0, K),
             "ground_truth_tokens": torch.zeros(0, K, dtype=torch.long), "rewards": torch.zeros(0)}
    return scored.model_copy(update=empty)


# (a scored batch no producer of the service makes, the reason it is dead-lettered with)
NOT_SCORED_BATCHES = [
    (_positive_logprob, r"behaviour_logprobs: a log-probability is finite and <= 0, got 0\.75 at \[3, 2\]"),
    (_no_positions, r"positions: shape \[2, 0\], a rollout batch needs at least one document and one position"),
]


@pytest.mark.parametrize("forge, reason", NOT_SCORED_BATCHES, ids=["positive-logprob", "no-positions"])
def test_a_scored_batch_no_producer_makes_is_dead_lettered_not_trained(learner: Learner, forge, reason: str) -> None:
    """A log-probability is <= 0: behaviour log-probs that are not would train with a wrong importance ratio. A
    batch without positions has no advantage groups: the update raised and ended the learner. Both are refused
    when decoded and dead-lettered with the field and the value; the learner goes on."""
    documents = _documents(0)
    good = _scored(documents)
    learner.documents.put(documents)
    learner.broker.publish(SCORED, forge(good))
    assert learner.run_once(block_ms=100) == 0
    assert learner.state.step == 0 and learner.broker.pending(SCORED, LEARNER_GROUP) == 0
    [dead] = learner.broker.dead_letters(SCORED)
    assert re.search(reason, dead.error), dead.error

    learner.broker.publish(SCORED, good)
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 1


def _past_vocabulary(documents: DocumentBatch) -> DocumentBatch:
    ids = documents.token_ids.clone()
    ids[1, 7] = 999
    return documents.model_copy(update={"token_ids": ids})


def _wrong_ground_truth(scored: ScoredBatch) -> ScoredBatch:
    truth = scored.ground_truth_tokens.clone()
    truth[5, 3] = (truth[5, 3] + 1) % 256
    return scored.model_copy(update={"ground_truth_tokens": truth})


# (the scored batch sent for docs-0, the reason it is ignored with): not rollouts this run made of docs-0
NOT_THE_RUNS = [
    (lambda docs: _scored(docs, reward_type="binary"),
     r"reward_type: 'binary', but the run scores with refine.reward='cosine'"),
    (lambda docs: _scored(docs, samples=1), r"num_samples: 1, but the run samples refine.num_samples=2 per position"),
    (lambda docs: _scored(docs, samples=3), r"num_samples: 3, but the run samples refine.num_samples=2 per position"),
    (lambda docs: _scored(docs, k=4), r"rollout_len: 4, but the run's rollouts have refine.rollout_len=5 tokens"),
    (lambda docs: _scored(docs, chunks=3), r"positions: 3 per document, but the run takes refine.num_chunks=4"),
    (lambda docs: _wrong_ground_truth(_scored(docs)),
     r"ground_truth_tokens\[5, 3\]=\d+, but document batch 'docs-0' has \d+ there \(token_ids\[0, 33\]\)"),
]


@pytest.mark.parametrize("make_batch, message", NOT_THE_RUNS, ids=[
    "reward-type", "fewer-samples", "more-samples", "rollout-len", "num-chunks", "ground-truth"])
def test_a_scored_batch_unlike_the_run_or_its_documents_is_ignored_and_the_runs_own_is_trained(
        learner: Learner, make_batch, message: str) -> None:
    """Another run's (or a forged) batch of a real document batch id is not trained, and leaves that batch alone:
    dropping it deleted the documents and counted the batch finished, and the run's own rollouts of them, coming
    later, were then skipped as duplicates."""
    documents = _documents(0)
    learner.documents.put(documents)
    learner.broker.publish(SCORED, make_batch(documents))
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 0 and learner.state.dropped_invalid == 0  # not trained on; the learner lives
    assert learner.broker.pending(SCORED, LEARNER_GROUP) == 0
    (report,) = _reports(learner)  # what the orchestrator writes to events.jsonl
    assert (report.kind, report.stats["reason"]) == ("dropped", "foreign")
    assert re.search(message, str(report.stats["error"])), report.stats["error"]
    assert "not this run's rollouts of document batch 'docs-0'" in str(report.stats["error"])
    assert _finished(learner) == 0 and learner.finished == 0
    assert _staleness_observations(learner) == 0  # not the run's rollouts: their age is not the run's

    learner.broker.publish(SCORED, _scored(documents))  # the run's own rollouts of docs-0
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 1 and _finished(learner) == 1 and learner.duplicates == 0
    assert _staleness_observations(learner) == 1


def _staleness_observations(learner: Learner) -> float:
    [count] = [sample.value for sample in learner.metrics.staleness.collect()[0].samples
               if sample.name.endswith("_count")]
    return count


def test_a_scored_batch_whose_stored_documents_the_model_cannot_read_is_dropped(learner: Learner) -> None:
    documents = _documents(0)
    learner.documents.put(_past_vocabulary(documents))
    learner.broker.publish(SCORED, _scored(documents))
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 0 and learner.state.dropped_invalid == 1
    (report,) = _reports(learner)
    assert (report.kind, report.stats["reason"]) == ("dropped", "invalid")
    assert re.search(r"documents: token_ids\[1, 7\]=999 is not below model.vocab_size=260", report.stats["error"])
    assert _finished(learner) == 1  # a batch the orchestrator published: finished

    good = _documents(1)
    learner.documents.put(good)
    learner.broker.publish(SCORED, _scored(good))
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 1


@pytest.mark.parametrize("stored", [False, True], ids=["no-documents", "documents-stored-too"])
def test_a_scored_batch_of_documents_the_orchestrator_never_published_is_ignored_and_not_counted(
        learner: Learner, stored: bool) -> None:
    """The orchestrator publishes while `published - finished` batches are unfinished: a foreign batch counted as
    finished (it was dropped as documents_missing, or trained when its documents were stored too) let it run one
    batch further ahead for the rest of the run (with max_staleness=0, rollouts that arrive stale and are
    dropped). It is acknowledged and reported, not trained, not counted."""
    foreign = _documents(0, batch_id="not-a-run-batch")
    if stored:
        learner.documents.put(foreign)
    learner.broker.publish(SCORED, _scored(foreign))
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 0 and learner.broker.pending(SCORED, LEARNER_GROUP) == 0
    assert _finished(learner) == 0 and learner.finished == 0
    (report,) = _reports(learner)
    assert (report.kind, report.stats["reason"]) == ("dropped", "foreign")
    assert "document_batch_id: 'not-a-run-batch' is not a document batch the orchestrator published" in str(
        report.stats["error"])

    documents = _documents(0)
    learner.documents.put(documents)
    learner.broker.publish(SCORED, _scored(documents))
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 1 and _finished(learner) == 1


@pytest.fixture
def colocated(make_learner) -> Learner:
    learner = make_learner("service.mode=colocated")
    learner.broker.ensure_group(DOCUMENTS, LEARNER_GROUP, start_id="0")
    return learner


def test_a_colocated_learner_ignores_a_document_batch_the_orchestrator_never_published(colocated: Learner) -> None:
    colocated.broker.publish(DOCUMENTS, _documents(0, batch_id="not-a-run-batch"))
    assert colocated.run_once(block_ms=100) == 1
    assert colocated.state.step == 0 and _finished(colocated) == 0
    assert colocated.broker.pending(DOCUMENTS, LEARNER_GROUP) == 0
    (report,) = _reports(colocated)
    assert (report.kind, report.stats["reason"]) == ("dropped", "foreign")
    assert str(report.stats["error"]).startswith("batch_id: 'not-a-run-batch' is not a document batch the "
                                                 "orchestrator published (those are 'docs-0', 'docs-1', ...)")

    colocated.broker.publish(DOCUMENTS, _documents(0))
    assert colocated.run_once(block_ms=100) == 1
    assert colocated.state.step == 1 and _finished(colocated) == 1


def test_a_colocated_learner_dead_letters_documents_its_model_cannot_read(colocated: Learner) -> None:
    """The fused step embeds the documents: an id past the vocabulary was an IndexError that ended the learner,
    and with it the run, unnamed. The entry is dead-lettered with the field and the value, as a rollout worker
    does; the learner goes on."""
    colocated.broker.publish(DOCUMENTS, _past_vocabulary(_documents(0)))
    assert colocated.run_once(block_ms=100) == 1
    assert colocated.state.step == 0 and _finished(colocated) == 0
    [dead] = colocated.broker.dead_letters(DOCUMENTS)
    assert dead.error == "learner learner-0 cannot train on document batch docs-0: token_ids[1, 7]=999 is not below " \
                         "model.vocab_size=260"
    assert colocated.broker.pending(DOCUMENTS, LEARNER_GROUP) == 0

    colocated.broker.publish(DOCUMENTS, _documents(1))
    assert colocated.run_once(block_ms=100) == 1
    assert colocated.state.step == 1


@pytest.mark.parametrize("stored", [False, True], ids=["no-documents", "documents-stored-too"])
def test_a_scored_batch_of_an_id_past_what_the_orchestrator_published_is_ignored(learner: Learner,
                                                                                  stored: bool) -> None:
    """The orchestrator records how many document batches it has issued before publishing each: a batch of docs-N
    at or past that count is not one of them (dropped as documents_missing it was counted finished and moved the
    pacing ahead for good; with documents stored under its id too, it was trained). Ignored and not counted; the
    real docs-N, once published, is trained."""
    write_published(learner.broker, 1)  # docs-0 only
    ahead = _documents(3)
    if stored:
        learner.documents.put(ahead)
    learner.broker.publish(SCORED, _scored(ahead))
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 0 and _finished(learner) == 0 and learner.finished == 0
    (report,) = _reports(learner)
    assert (report.kind, report.stats["reason"]) == ("dropped", "foreign")
    assert ("document_batch_id: 'docs-3' is past the 1 document batches the orchestrator has published"
            in str(report.stats["error"]))

    documents = _documents(0)
    learner.documents.put(documents)
    learner.broker.publish(SCORED, _scored(documents))
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 1 and _finished(learner) == 1


def test_a_published_batch_whose_documents_are_gone_ends_the_run_as_lost_state_after_a_checkpoint(
        learner: Learner) -> None:
    """The orchestrator stores a batch's documents before publishing it, and they go only when it is finished: a
    published, unfinished batch without them means a Redis that lost the run's state (restarted empty, flushed).
    Dropping it counted it finished, and the run went on past its documents, exit 0."""
    write_published(learner.broker, 2)
    documents = _documents(0)
    learner.documents.put(documents)
    learner.broker.publish(SCORED, _scored(documents))
    learner.broker.publish(SCORED, _scored(_documents(1)))  # its documents are gone
    learner.config.train.steps = 10
    stop = threading.Timer(30, learner.broker.request_stop, ["test"])  # ends a learner that took the batch as done
    stop.start()
    try:
        with pytest.raises(RedisStateLost, match=r"the documents of batch 'docs-1', published and not yet trained, "
                                                 r"are gone from Redis"):
            learner.run(block_ms=100)
    finally:
        stop.cancel()
    assert learner.state.step == 1 and learner.finished == 1
    assert read_learner_state(latest_checkpoint(learner.out_dir)).step == 1  # the step trained is kept
    assert learner.broker.pending(SCORED, LEARNER_GROUP) == 1  # neither acknowledged nor counted


def test_a_colocated_learners_weight_version_is_its_step_whatever_the_sync_interval(make_learner) -> None:
    """The fused step samples from the current weights: rows and the gauge said 0, 0, 3 with sync_interval=3."""
    colocated = make_learner("service.mode=colocated", "service.sync_interval=3", "service.max_staleness=2")
    colocated.broker.ensure_group(DOCUMENTS, LEARNER_GROUP, start_id="0")
    for index in range(2):
        colocated.broker.publish(DOCUMENTS, _documents(index))
        assert colocated.run_once(block_ms=100) == 1
        assert colocated.state.step == colocated.state.weight_version == index + 1


def test_a_disaggregated_learner_measures_staleness_in_steps_not_published_versions(make_learner) -> None:
    """With sync_interval > 1 the published version lags the step: at step 3 with sync_interval=2 it is 2. Without
    this, staleness taken from the published version would keep rollouts of version 0 at step 3 (2 old) under
    max_staleness=2 although they are 3 steps old, and a run would train further off-policy than it allows."""
    learner = make_learner("service.sync_interval=2", "service.max_staleness=2")
    learner.broker.ensure_group(SCORED, LEARNER_GROUP, start_id="0")
    for index in range(4):
        documents = _documents(index)
        learner.documents.put(documents)
        learner.broker.publish(SCORED, _scored(documents))  # every batch rolled out with version 0
        assert learner.run_once(block_ms=100) == 1
        assert learner.state.step == min(index + 1, 3)  # 0, 1 and 2 steps old: trained; then 3 old: dropped
    assert learner.state.weight_version == 2 and learner.state.dropped_stale == 1
    dropped = _reports(learner)[-1]
    assert (dropped.kind, dropped.stats["reason"], dropped.stats["staleness"]) == ("dropped", "stale", 3)


def test_a_batch_dropped_past_an_unfinished_one_is_a_duplicate_when_delivered_again(learner: Learner) -> None:
    """While docs-0 is unfinished, docs-1 lies past the run of finished batches, so only the dropped set remembers
    that it was dropped. Without this, a redelivery of its rollouts (a reclaimed entry, a worker that rolled it out
    twice) would not be known for a duplicate: its documents, deleted with the drop, would be taken for state
    Redis lost, and the run would end (or, were they still stored, the batch would be trained a second time)."""
    first, second = _documents(0), _documents(1)
    learner.documents.put(first)
    learner.documents.put(second)
    ahead = _scored(second).model_copy(update={"policy_version": 5})  # from a version the learner has not reached
    learner.broker.publish(SCORED, ahead)
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 0 and _reports(learner)[-1].stats["reason"] == "future_version"

    learner.broker.publish(SCORED, _scored(second))  # the same rollout batch id, now of version 0
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 0 and learner.duplicates == 1

    learner.broker.publish(SCORED, _scored(first))  # docs-0 is still trained
    assert learner.run_once(block_ms=100) == 1
    assert learner.state.step == 1 and _finished(learner) == 2


@pytest.mark.parametrize("lost", ["progress", "weights"])
def test_a_learner_waiting_on_a_redis_that_lost_its_last_writes_ends_the_run_as_lost_state(
        make_learner, lost: str) -> None:
    """A Redis killed before its append-only file had its last writes (appendfsync everysec) came back with an older
    progress record (the orchestrator then published no more batches: the run hung with stall warnings) or without
    the newest weights (every batch rolled out with older ones was dropped as stale). Waiting for a batch, the learner
    now finds what it wrote missing and ends the run as lost state, after a checkpoint of the step it trained."""
    learner = make_learner()
    learner.broker.ensure_group(SCORED, LEARNER_GROUP, start_id="0")
    learner.setup()
    assert learner.run_once(block_ms=100) == 0  # Redis holds what it wrote: it waits
    write_published(learner.broker, 1)
    documents = _documents(0)
    learner.documents.put(documents)
    learner.broker.publish(SCORED, _scored(documents))
    assert learner.run_once(block_ms=100) == 1 and learner.state.step == learner.state.weight_version == 1
    assert learner.run_once(block_ms=100) == 0
    if lost == "progress":
        write_progress(learner.broker, LearnerProgress(step=0, finished=0, unbroken=0, weight_version=0))
        reason = (r"the learner's progress record is behind what it wrote \(Redis holds step 0, 0 batches finished; "
                  r"it wrote step 1, 1 batches finished\)")
    else:
        learner.weights.clear()
        learner.weights.publish(learner.model.state_dict(), 0)
        reason = r"weight version 1, the learner's last published, is gone from Redis \(its latest version: 0\)"
    learner.config.train.steps = 10
    stop = threading.Timer(30, learner.broker.request_stop, ["test"])  # ends a learner that waits on regardless
    stop.start()
    try:
        with pytest.raises(RedisStateLost, match=reason):
            learner.run(block_ms=100)
    finally:
        stop.cancel()
    assert read_learner_state(latest_checkpoint(learner.out_dir)).step == 1
