"""The rollout worker as a plain object (no Ray) on a real Redis: it waits for weights, rolls a document
batch out with the newest weights, publishes the RolloutBatch and only then acknowledges the documents,
takes over batches a dead worker left behind, and stops on the run's stop flag."""

import json
import re
import threading
import time
from pathlib import Path

import pytest
import redis
import torch

from refine.loop import prepare_model
from rollout_helpers import moved_weights, orchestrator_batches
from refine.algorithm.rollout import batch_generator
from rollout_workers.engines import SnapshotEngine
from rollout_workers.worker import MAX_DELIVERIES, ROLE, RolloutWorker
from services.broker import Broker
from services.codec import CodecLimits, decode
from services.messages import DocumentBatch, RolloutBatch
from services.redis_server import connect
from services.streams import DOCUMENTS, REWARD_GROUP, ROLLOUT_GROUP, ROLLOUTS, rollout_batch_id_for
from services.weight_store import RedisWeightStore


@pytest.fixture
def config(tiny_config):
    return tiny_config()


@pytest.fixture
def store(redis_client: redis.Redis, namespace: str) -> RedisWeightStore:
    return RedisWeightStore(redis_client, namespace)


@pytest.fixture
def make_worker(config, redis_url: str, namespace: str):
    """Workers of this test's run; each one's runtime (heartbeat thread, metrics endpoint) is closed at the end."""
    workers = []

    def make(worker_id: str = "worker-0") -> RolloutWorker:
        worker = RolloutWorker(config.model_dump_json(), worker_id, redis_url, namespace)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.runtime.close()


def start_run(broker: Broker, batches: list[DocumentBatch]) -> list[str]:
    """What the orchestrator does: create the consumer groups from the stream start, publish documents."""
    broker.ensure_group(DOCUMENTS, ROLLOUT_GROUP, start_id="0")
    broker.ensure_group(ROLLOUTS, REWARD_GROUP, start_id="0")
    return [broker.publish(DOCUMENTS, batch) for batch in batches]


def initial_weights(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """The learner's starting weights, moved by `seed` so versions differ."""
    return moved_weights(prepare_model(config).state_dict(), seed)


def published_rollouts(broker: Broker) -> list[RolloutBatch]:
    return [message for _, message in broker.consume(ROLLOUTS, REWARD_GROUP, "reward-0", RolloutBatch, count=100)]


def counted(counter) -> float:
    """A Prometheus counter's total, as a scrape reads it."""
    [total] = [sample.value for sample in counter.collect()[0].samples if sample.name.endswith("_total")]
    return total


def delivered(broker: Broker) -> str:
    """The last documents entry the rollout group handed to any consumer."""
    groups = broker.client.xinfo_groups(broker.key("stream", DOCUMENTS))
    group = next(g for g in groups if g["name"] == ROLLOUT_GROUP.encode())
    return group["last-delivered-id"].decode()


def test_run_once_waits_for_weights_without_taking_a_batch(config, broker, store, make_worker) -> None:
    """Before the learner published weights, run_once returns False and leaves the batch in the stream,
    undelivered; once weights exist the same batch is rolled out."""
    [batch] = orchestrator_batches(config, 1)
    start_run(broker, [batch])
    worker = make_worker()
    assert worker.run_once(block_ms=100) is False
    assert worker.version is None
    assert delivered(broker) == "0-0" and broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0
    assert broker.length(ROLLOUTS) == 0

    store.publish(initial_weights(config), 0)
    assert worker.run_once(block_ms=100) is True
    assert [m.document_batch_id for m in published_rollouts(broker)] == [batch.batch_id]


def test_run_once_publishes_the_rollouts_then_acknowledges_the_documents(config, broker, store, make_worker) -> None:
    """One RolloutBatch per document batch, tagged with its id and the worker's weight version, holding
    B * c * n rollouts of k tokens sampled with the batch's own generator; the documents entry is
    acknowledged and nothing is left pending."""
    [batch] = orchestrator_batches(config, 1)
    weights = initial_weights(config, seed=3)
    store.publish(weights, 3)
    start_run(broker, [batch])
    worker = make_worker("worker-7")
    assert worker.run_once(block_ms=100) is True
    assert worker.version == 3 and worker.engine.weight_version == 3

    [message] = published_rollouts(broker)
    refine = config.refine
    rows = batch.batch_size * refine.num_chunks * refine.num_samples
    assert message.rollout_batch_id == rollout_batch_id_for(batch.batch_id) == "docs-0.rollouts"
    assert message.document_batch_id == batch.batch_id
    assert message.policy_version == 3
    assert message.worker_id == "worker-7"
    assert message.num_rollouts == rows == 16
    assert (message.num_samples, message.rollout_len) == (refine.num_samples, refine.rollout_len)
    assert message.rollout_tokens.shape == message.behaviour_logprobs.shape == (rows, refine.rollout_len)
    assert message.positions.shape == (batch.batch_size, refine.num_chunks)
    assert message.rollout_hidden.shape == (rows, refine.rollout_len, config.model.hidden_size)

    # The same rollouts as the snapshot engine makes from these weights and the batch's data cursor.
    engine = SnapshotEngine(config)
    engine.load_weights(weights, 3)
    expected = engine.rollout(batch.token_ids, batch.lengths,
                              batch_generator(config.train.seed, batch.cursor.epoch, batch.cursor.offset))
    assert torch.equal(message.rollout_tokens, expected.tokens)
    assert torch.equal(message.positions, expected.positions)
    assert torch.equal(message.ground_truth_tokens, expected.target_tokens)

    assert broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0
    assert delivered(broker) != "0-0"  # delivered, then acknowledged
    assert (worker.batches, worker.versions) == (1, (3, 3))
    assert counted(worker.metrics.rollouts) == rows and counted(worker.metrics.rollout_tokens) == rows * refine.rollout_len
    assert worker.run_once(block_ms=100) is False  # nothing left to do
    assert broker.length(ROLLOUTS) == 1


def test_a_newer_weight_version_is_loaded_before_the_next_batch(config, broker, store, make_worker) -> None:
    """refresh_weights loads only a version it does not have; run_once rolls each batch out with the
    newest version published before it."""
    first, second = orchestrator_batches(config, 2)
    start_run(broker, [first])
    worker = make_worker()
    assert worker.refresh_weights() is False  # nothing published yet
    store.publish(initial_weights(config, seed=1), 1)
    assert worker.run_once(block_ms=100) is True
    assert worker.refresh_weights() is False  # still the newest

    newer = initial_weights(config, seed=2)
    store.publish(newer, 2)
    broker.publish(DOCUMENTS, second)
    assert worker.run_once(block_ms=100) is True
    assert worker.version == 2
    loaded = worker.engine.model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in newer.items())
    assert [(m.document_batch_id, m.policy_version) for m in published_rollouts(broker)] == [
        (first.batch_id, 1), (second.batch_id, 2)]
    assert worker.versions == (1, 2) and worker.batches == 2

    store.publish(initial_weights(config, seed=3), 3)
    assert worker.refresh_weights() is True and worker.version == 3


def test_rollouts_are_tagged_with_the_version_fetched_not_the_pointer_read_before(config, broker, store, make_worker,
                                                                                  monkeypatch) -> None:
    """The learner can publish between the worker's read of the latest pointer and its fetch, which loads the
    newest weights. Without this, the worker could record the pointer it read: its rollouts would carry an older
    policy_version than the weights that made them (the learner's staleness check and importance ratios would
    be off by a version), and the next refresh would reload weights it already has."""
    [batch] = orchestrator_batches(config, 1)
    store.publish(initial_weights(config, seed=1), 1)
    worker = make_worker()
    read_pointer = worker.weights.latest_version

    def pointer_then_the_learner_publishes() -> int | None:
        latest = read_pointer()
        if latest == 1:
            store.publish(initial_weights(config, seed=2), 2)
        return latest

    monkeypatch.setattr(worker.weights, "latest_version", pointer_then_the_learner_publishes)
    assert worker.refresh_weights() is True
    assert worker.rollout(batch).policy_version == worker.engine.weight_version == 2
    assert worker.refresh_weights() is False  # version 2 is what it holds


def test_weights_published_while_waiting_for_a_batch_are_used_for_it(config, broker, store, redis_url, namespace,
                                                                       make_worker) -> None:
    """A version that lands while run_once blocks waiting for documents is loaded before the rollout."""
    [batch] = orchestrator_batches(config, 1)
    start_run(broker, [])
    store.publish(initial_weights(config, seed=1), 1)
    worker = make_worker()
    worker.refresh_weights()
    # Another client, as the learner and the orchestrator are: new weights, then the batch they pace.
    learner = Broker(connect(redis_url), namespace)

    def learner_then_orchestrator() -> None:
        RedisWeightStore(learner.client, namespace).publish(initial_weights(config, seed=2), 2)
        learner.publish(DOCUMENTS, batch)

    timer = threading.Timer(0.5, learner_then_orchestrator)
    timer.start()
    try:
        assert worker.run_once(block_ms=5_000) is True  # below the client's socket timeout (10 s)
    finally:
        timer.join()
        learner.client.close()
    assert [(m.document_batch_id, m.policy_version) for m in published_rollouts(broker)] == [(batch.batch_id, 2)]


def age(broker: Broker, consumer: str, entry_id: str, idle_ms: int, deliveries: int | None = None) -> None:
    """Make `consumer`'s pending entry look idle for `idle_ms` (and delivered `deliveries` times), as if
    it had died that long ago holding it: XCLAIM to the same owner with IDLE (and RETRYCOUNT)."""
    broker.client.xclaim(broker.key("stream", DOCUMENTS), ROLLOUT_GROUP, consumer, 0, [entry_id],
                         idle=idle_ms, retrycount=deliveries, justid=True)


def test_an_entry_a_dead_worker_held_too_long_is_reclaimed(config, broker, store, make_worker) -> None:
    """An entry pending for a consumer that stopped working is left alone while it is younger than
    service.reclaim_idle_ms, then taken over by next_batch, rolled out and acknowledged."""
    [batch] = orchestrator_batches(config, 1)
    store.publish(initial_weights(config), 0)
    [entry_id] = start_run(broker, [batch])
    [(taken_id, _)] = broker.consume(DOCUMENTS, ROLLOUT_GROUP, "dead-worker", DocumentBatch, count=1)
    assert taken_id == entry_id
    worker = make_worker()
    idle_ms = config.service.reclaim_idle_ms  # 2 heartbeat timeouts (at least 6 s): aged, not waited for

    assert worker.next_batch(block_ms=100) is None  # fresh: its owner may still be working on it
    age(broker, "dead-worker", entry_id, idle_ms - 2000)
    assert worker.next_batch(block_ms=100) is None  # not idle long enough yet

    age(broker, "dead-worker", entry_id, idle_ms + 1000)
    assert worker.run_once(block_ms=100) is True
    [message] = published_rollouts(broker)
    assert (message.document_batch_id, message.worker_id) == (batch.batch_id, "worker-0")
    assert broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0


def test_reclaim_hands_out_an_entry_until_max_deliveries(config, broker, make_worker) -> None:
    """next_batch reclaims an idle entry delivered up to MAX_DELIVERIES times (returning its entry id),
    and dead-letters one delivered more often: a batch that keeps killing workers stops being retried."""
    batches = orchestrator_batches(config, 2)
    ids = start_run(broker, batches)
    broker.consume(DOCUMENTS, ROLLOUT_GROUP, "dead-worker", DocumentBatch, count=2)
    worker = make_worker()
    idle_ms = config.service.reclaim_idle_ms + 1000
    age(broker, "dead-worker", ids[0], idle_ms, deliveries=MAX_DELIVERIES)  # the claim makes it one more
    age(broker, "dead-worker", ids[1], idle_ms, deliveries=MAX_DELIVERIES - 1)

    # One entry per call, oldest first: the first is dead-lettered (and nothing new is in the stream) ...
    assert worker.next_batch(block_ms=100) is None
    [dead] = broker.dead_letters(DOCUMENTS)
    assert dead.entry_id == ids[0] and f"max_deliveries={MAX_DELIVERIES}" in dead.error
    # ... the next call hands out the other one.
    claimed = worker.next_batch(block_ms=100)
    assert claimed is not None
    assert (claimed[0], claimed[1].batch_id) == (ids[1], batches[1].batch_id)
    [row] = broker.client.xpending_range(broker.key("stream", DOCUMENTS), ROLLOUT_GROUP, ids[1], ids[1], 1)
    assert (row["consumer"].decode(), row["times_delivered"]) == ("worker-0", MAX_DELIVERIES)

    assert len(broker.dead_letters(DOCUMENTS)) == 1
    assert worker.next_batch(block_ms=100) is None
    assert broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 1  # only the batch the worker now holds


def test_run_returns_its_summary_once_the_stop_flag_is_set(config, broker, store, make_worker, tmp_path: Path) -> None:
    """run() works through the published batches until the run's stop flag is set, then closes its
    runtime (heartbeat withdrawn, metrics announcement removed) and returns a JSON summary."""
    batches = orchestrator_batches(config, 2)
    store.publish(initial_weights(config), 4)
    start_run(broker, batches)
    worker = make_worker("worker-3")
    assert "worker-3" in broker.heartbeats(ROLE)
    announcements = tmp_path / "prometheus"
    assert any("worker-3" in path.read_text() for path in announcements.iterdir())

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=worker.run(block_ms=100)), name="worker-3")
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while broker.length(ROLLOUTS) < 2 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert broker.length(ROLLOUTS) == 2
    finally:
        broker.request_stop("test over")
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert json.loads(outcome["summary"]) == {"worker_id": "worker-3", "batches": 2, "first_version": 4,
                                              "last_version": 4}
    assert "worker-3" not in broker.heartbeats(ROLE)
    assert not any("worker-3" in path.read_text() for path in announcements.iterdir())
    assert broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0


def test_run_stops_at_once_when_the_stop_flag_is_already_set(config, broker, store, make_worker) -> None:
    """A worker started after the stop was requested rolls nothing out and reports no versions."""
    store.publish(initial_weights(config), 0)
    start_run(broker, orchestrator_batches(config, 1))
    broker.request_stop("done")
    worker = make_worker()
    assert json.loads(worker.run(block_ms=100)) == {"worker_id": "worker-0", "batches": 0, "first_version": None,
                                                    "last_version": None}
    assert broker.length(ROLLOUTS) == 0 and delivered(broker) == "0-0"


def test_run_closes_its_engine_on_the_way_out(config, broker, store, make_worker, monkeypatch) -> None:
    """A vLLM engine stages its weights in a temporary folder that only close() removes: every run left one per
    worker behind."""
    store.publish(initial_weights(config), 0)
    broker.request_stop("done")
    worker = make_worker()
    closed = []
    monkeypatch.setattr(worker.engine, "close", lambda: closed.append(True))
    worker.run(block_ms=100)
    assert closed == [True]


# A document batch of the tiny config (about 1.5 kB) fits; its rollouts (about 43 kB, 40960 bytes of them
# hidden states) do not: the over-limit case of a real config (hundreds of MB) without building one.
SMALL_LIMIT = 20_000


def over_the_limit(worker: RolloutWorker) -> None:
    """The worker's codec limit (services.codec.CodecLimits on its broker, not a run setting) set low."""
    worker.broker.limits = CodecLimits(max_message_bytes=SMALL_LIMIT)


def settings_text(config) -> str:
    """How the dead letter names the settings that size a RolloutBatch of `config`."""
    train, refine, hidden = config.train, config.refine, config.model.hidden_size
    rows = train.batch_size * refine.num_chunks * refine.num_samples
    return (f"train.batch_size={train.batch_size} x refine.num_chunks={refine.num_chunks} x refine.num_samples="
            f"{refine.num_samples} = {rows} rollouts of refine.rollout_len={refine.rollout_len} tokens, each token "
            f"with 2 hidden states (rollout_hidden, ground_truth_hidden) of model.hidden_size={hidden} float32 "
            f"values: 2 x {rows} x {refine.rollout_len} x {hidden} x 4 bytes = "
            f"{2 * rows * refine.rollout_len * hidden * 4} bytes")


def test_rollouts_over_the_message_limit_dead_letter_their_documents_at_once(config, broker, store,
                                                                             make_worker) -> None:
    """Rollouts the codec refuses (over max_message_bytes) can never be published: the worker does not die
    (the actor would be restarted and the batch redelivered to worker after worker until MAX_DELIVERIES),
    it dead-letters the documents entry once, with the reason naming the message, its size, the limit and
    the settings that size it, acknowledged, so no worker rolls it out again."""
    batches = orchestrator_batches(config, 2)
    store.publish(initial_weights(config), 0)
    ids = start_run(broker, batches)
    worker = make_worker()
    over_the_limit(worker)

    assert worker.run_once(block_ms=100) is False  # no CodecError escapes
    [dead] = broker.dead_letters(DOCUMENTS)
    assert dead.entry_id == ids[0]
    assert decode(dead.payload, DocumentBatch).batch_id == batches[0].batch_id  # the input, kept for a look
    size = int(re.search(r"message RolloutBatch is (\d+) bytes, over the limit max_message_bytes=(\d+)",
                         dead.error).group(1))
    assert size > SMALL_LIMIT and f"max_message_bytes={SMALL_LIMIT} " in dead.error
    assert dead.error.startswith("rollout worker worker-0 could not publish the rollouts of document batch docs-0: ")
    assert "services.codec.CodecLimits.max_message_bytes, 268435456 = 256 MiB by default" in dead.error
    assert settings_text(config) in dead.error
    # Acknowledged: nothing pending, nothing published, nothing for another worker to take over.
    assert broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0 and broker.length(ROLLOUTS) == 0
    assert broker.reclaim(DOCUMENTS, ROLLOUT_GROUP, "worker-1", DocumentBatch, min_idle_ms=0) == []
    assert (worker.batches, worker.dead_lettered) == (0, 1)
    # refine_rollouts counts rollouts published: these reached no one (it counted them).
    assert counted(worker.metrics.rollouts) == counted(worker.metrics.rollout_tokens) == 0

    # The worker's loop goes on with the next batch (dead-lettered too: same settings, same size) and
    # ends on the stop flag with its summary, as a Ray actor's run() must.
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=worker.run(block_ms=100)), name="worker-0")
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(broker.dead_letters(DOCUMENTS)) < 2 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert thread.is_alive()
        assert [d.entry_id for d in broker.dead_letters(DOCUMENTS)] == ids  # each once
    finally:
        broker.request_stop("test over")
        thread.join(timeout=30)
    assert json.loads(outcome["summary"])["batches"] == 0
    assert worker.dead_lettered == 2 and broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0


def test_the_run_ends_with_the_reason_of_rollouts_over_the_message_limit(config, broker, store, make_worker,
                                                                          dead_letter_error, namespace: str) -> None:
    """The orchestrator ends the run on that dead letter with an error quoting it: the message type, its
    size, the limit and its setting, and the run settings that size the rollouts."""
    store.publish(initial_weights(config), 0)
    start_run(broker, orchestrator_batches(config, 1))
    worker = make_worker()
    over_the_limit(worker)
    assert worker.run_once(block_ms=100) is False
    text = dead_letter_error(config, namespace)
    assert text.startswith("a message of stream 'documents' could not be used (entry ")
    assert re.search(rf"message RolloutBatch is \d+ bytes, over the limit max_message_bytes={SMALL_LIMIT} ", text)
    assert "services.codec.CodecLimits.max_message_bytes" in text
    assert settings_text(config) in text


def test_a_transient_redis_error_while_publishing_is_retried_not_dead_lettered(config, broker, store,
                                                                                make_worker) -> None:
    """Only a message the codec refuses is dead-lettered: a connection lost while publishing is retried
    (retry_redis) and the rollouts are published as before."""
    store.publish(initial_weights(config), 0)
    start_run(broker, orchestrator_batches(config, 1))
    worker = make_worker()
    publish, failures = worker.broker.publish, []

    def flaky_publish(stream, message, *args, **kwargs):
        if stream == ROLLOUTS and not failures:
            failures.append(stream)
            raise redis.ConnectionError("connection lost while publishing")
        return publish(stream, message, *args, **kwargs)

    worker.broker.publish = flaky_publish
    assert worker.run_once(block_ms=100) is True
    assert failures == [ROLLOUTS] and broker.length(ROLLOUTS) == 1
    assert broker.dead_letters(DOCUMENTS) == [] and broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0


def _token_past_vocabulary(batch: DocumentBatch) -> DocumentBatch:
    ids = batch.token_ids.clone()
    ids[1, 5] = 300  # model.vocab_size=260
    return batch.model_copy(update={"token_ids": ids})


def _token_in_the_padding_past_vocabulary(batch: DocumentBatch) -> DocumentBatch:
    ids = batch.token_ids.clone()
    ids[0, -1] = 260  # the padding is embedded too
    return batch.model_copy(update={"token_ids": ids, "lengths": torch.tensor([ids.shape[1] - 1, 100])})


def _short_document(batch: DocumentBatch) -> DocumentBatch:
    return batch.model_copy(update={"lengths": torch.tensor([100, 30])})


# (how a forged or corrupt entry differs from the orchestrator's batch, the reason it is dead-lettered with)
UNUSABLE_DOCUMENTS = [
    (_token_past_vocabulary, r"token_ids\[1, 5\]=300 is not below model.vocab_size=260"),
    (_token_in_the_padding_past_vocabulary, r"token_ids\[0, \d+\]=260 is not below model.vocab_size=260"),
    (_short_document, r"lengths\[1\]=30 is too short: rollouts need documents of at least 40 tokens "
                      r"\(refine.num_chunks=4, refine.rollout_len=5, refine.margin=20\)"),
]


@pytest.mark.parametrize("change, reason", UNUSABLE_DOCUMENTS, ids=["token-past-vocabulary", "padding-past-vocabulary",
                                                                    "short-document"])
def test_documents_the_model_cannot_roll_out_are_dead_lettered_at_once_and_the_worker_goes_on(
        config, broker, store, make_worker, change, reason: str) -> None:
    """A document batch the service did not produce (a forged or corrupt entry) with a token id past the model's
    vocabulary (an IndexError inside the embedding) or a document too short for rollouts would kill worker after
    worker until MAX_DELIVERIES: it is checked before the rollout and dead-lettered at once, acknowledged, with a
    reason naming the field, the value and the limit; the worker goes on with the next batch."""
    first, second = orchestrator_batches(config, 2)
    bad = change(first)
    store.publish(initial_weights(config), 0)
    ids = start_run(broker, [bad, second])
    worker = make_worker()

    assert worker.run_once(block_ms=100) is False  # nothing escapes
    [dead] = broker.dead_letters(DOCUMENTS)
    assert dead.entry_id == ids[0]
    assert dead.error.startswith(f"rollout worker worker-0 cannot roll out document batch {first.batch_id}: ")
    assert re.search(reason, dead.error), dead.error
    assert broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0 and broker.length(ROLLOUTS) == 0
    assert (worker.batches, worker.dead_lettered) == (0, 1)

    assert worker.run_once(block_ms=100) is True
    assert [message.document_batch_id for message in published_rollouts(broker)] == [second.batch_id]
    assert len(broker.dead_letters(DOCUMENTS)) == 1


def test_the_run_ends_with_the_reason_of_documents_the_model_cannot_roll_out(config, broker, store, make_worker,
                                                                              dead_letter_error, namespace) -> None:
    """The orchestrator ends the run on that dead letter, quoting the field, the value and the vocabulary size."""
    [batch] = orchestrator_batches(config, 1)
    store.publish(initial_weights(config), 0)
    start_run(broker, [_token_past_vocabulary(batch)])
    assert make_worker().run_once(block_ms=100) is False
    text = dead_letter_error(config, namespace)
    assert text.startswith("a message of stream 'documents' could not be used (entry ")
    assert text.endswith("): rollout worker worker-0 cannot roll out document batch docs-0: token_ids[1, 5]=300 "
                         "is not below model.vocab_size=260")


def test_a_batch_whose_logits_are_not_finite_is_dead_lettered_at_once_naming_the_weight_version(
        config, broker, store, make_worker) -> None:
    """Finite weights whose logits overflow (the final norm's scale at 3e38): the rollout fails the same on every
    retry at those weights, so the batch is dead-lettered at once, acknowledged, with the reason and the weight
    version, rather than kill worker after worker until MAX_DELIVERIES."""
    [batch] = orchestrator_batches(config, 1)
    weights = {name: value.clone() for name, value in initial_weights(config).items()}
    weights["model.norm.weight"].fill_(3e38)
    assert all(bool(torch.isfinite(value).all()) for value in weights.values() if value.is_floating_point())
    store.publish(weights, 7)
    [entry] = start_run(broker, [batch])
    worker = make_worker()

    assert worker.run_once(block_ms=100) is False  # nothing escapes
    [dead] = broker.dead_letters(DOCUMENTS)
    assert dead.entry_id == entry
    assert dead.error.startswith(f"rollout worker worker-0 cannot roll out document batch {batch.batch_id} at weight "
                                 f"version 7: the model's "), dead.error
    assert "must be finite" in dead.error and "nan" in dead.error.lower(), dead.error
    assert broker.pending(DOCUMENTS, ROLLOUT_GROUP) == 0 and broker.length(ROLLOUTS) == 0
    assert (worker.batches, worker.dead_lettered) == (0, 1)
