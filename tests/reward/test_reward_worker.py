"""Reward replicas on a real Redis: split work, ack after publish, reclaim, dead letters."""

import re
import threading
import time
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import redis
import torch

import reward.worker as reward_worker
from refine.algorithm.rewards import cosine_reward, register_reward, unregister_reward
from refine.config import load_config
from reward.worker import HEARTBEAT_ROLE, RewardWorker
from services.broker import Broker
from services.codec import CodecLimits, decode, encode
from services.messages import RolloutBatch, ScoredBatch
from services.metrics import Metrics


def publish(broker: Broker, batches: list[RolloutBatch]) -> None:
    for batch in batches:
        broker.publish("rollouts", batch)


def scored_messages(broker: Broker) -> list[ScoredBatch]:
    """Everything in the scored stream, read through a group of its own."""
    messages = broker.consume("scored", "check", "checker", ScoredBatch, count=1000)
    return [message for _entry, message in messages]


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_two_replicas_score_every_batch_exactly_once(broker, make_batch):
    batches = [make_batch(seed=i, docs=2, chunks=2, k=3, dim=5) for i in range(12)]
    metrics = Metrics()
    workers = [RewardWorker(broker, "cosine", consumer=f"reward-{i}", metrics=metrics) for i in range(2)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=worker.run, args=(stop,), kwargs={"count": 2, "block_ms": 100}, daemon=True)
        for worker in workers
    ]
    for thread in threads:
        thread.start()
    try:
        publish(broker, batches)
        wait_for(lambda: broker.length("scored") >= len(batches) and broker.pending("rollouts", "reward") == 0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)

    scored = scored_messages(broker)
    counts = Counter(message.rollout_batch_id for message in scored)
    assert counts == Counter(batch.rollout_batch_id for batch in batches)  # each exactly once
    by_id = {batch.rollout_batch_id: batch for batch in batches}
    for message in scored:
        source = by_id[message.rollout_batch_id]
        expected = cosine_reward(source.rollout_hidden, source.ground_truth_hidden).float()
        torch.testing.assert_close(message.rewards, expected)
        assert message.reward_type == "cosine"
    assert sum(worker.scored_count for worker in workers) == len(batches)
    assert metrics.registry.get_sample_value("refine_scored_batches_total") == len(batches)
    assert metrics.registry.get_sample_value("refine_reward_latency_seconds_count") == len(batches)
    # Both replicas left cleanly: no heartbeat remains to be mistaken for a dead replica.
    assert broker.heartbeats(HEARTBEAT_ROLE) == {}


def test_replicas_in_one_group_split_the_work(broker, make_batch):
    batches = [make_batch(seed=i) for i in range(6)]
    publish(broker, batches)
    first = RewardWorker(broker, "binary", consumer="reward-a")
    second = RewardWorker(broker, "binary", consumer="reward-b")
    handled = [first.run_once(count=2, block_ms=None), second.run_once(count=2, block_ms=None),
               first.run_once(count=2, block_ms=None), second.run_once(count=2, block_ms=None)]
    assert handled == [2, 2, 2, 0]
    assert (first.scored_count, second.scored_count) == (4, 2)
    assert sorted(m.rollout_batch_id for m in scored_messages(broker)) == sorted(b.rollout_batch_id for b in batches)
    assert broker.pending("rollouts", "reward") == 0


class FailingPublishBroker(Broker):
    """A broker whose Redis connection breaks exactly when a scored batch is published."""

    def publish(self, stream, message, maxlen=None, approximate=True):
        if stream == "scored":
            raise redis.ConnectionError("connection lost while publishing")
        return super().publish(stream, message, maxlen=maxlen, approximate=approximate)


def test_nothing_is_acknowledged_before_its_scored_batch_is_published(broker, make_batch):
    batch = make_batch(seed=1)
    publish(broker, [batch])
    flaky = RewardWorker(FailingPublishBroker(broker.client, broker.namespace), "cosine", consumer="reward-a")
    with pytest.raises(redis.ConnectionError):
        flaky.run_once(block_ms=None)
    assert broker.pending("rollouts", "reward") == 1  # still held, not acknowledged
    assert broker.length("scored") == 0

    healthy = RewardWorker(broker, "cosine", consumer="reward-b")
    assert healthy.reclaim(min_idle_ms=0) == 1
    assert [m.rollout_batch_id for m in scored_messages(broker)] == [batch.rollout_batch_id]
    assert broker.pending("rollouts", "reward") == 0


def test_a_dead_replicas_batches_are_reclaimed(broker, make_batch):
    batches = [make_batch(seed=i) for i in range(3)]
    publish(broker, batches)
    survivor = RewardWorker(broker, "hybrid", consumer="reward-b")
    # Replica a receives the batches, then dies before scoring them.
    delivered = broker.consume("rollouts", "reward", "reward-a", RolloutBatch, count=10)
    assert len(delivered) == 3
    assert survivor.run_once(block_ms=None) == 0  # nothing new: the batches belong to reward-a
    assert survivor.reclaim(min_idle_ms=600_000) == 0  # reward-a might still be alive
    time.sleep(0.05)
    assert survivor.reclaim(min_idle_ms=20) == 3
    assert sorted(m.rollout_batch_id for m in scored_messages(broker)) == sorted(b.rollout_batch_id for b in batches)
    assert broker.pending("rollouts", "reward") == 0
    assert survivor.reclaim(min_idle_ms=0) == 0


def test_batches_that_cannot_be_scored_go_to_dead_letters(broker, make_batch):
    good = make_batch(seed=1)
    no_hidden = make_batch(seed=2, hidden=False)
    publish(broker, [no_hidden])
    # An entry that is not a message at all (written by something else).
    broker.client.xadd(broker.key("stream", "rollouts"), {b"m": b"\x93garbage", b"t": b"RolloutBatch"})
    publish(broker, [good])
    worker = RewardWorker(broker, "cosine", consumer="reward-a")
    assert worker.run_once(count=10, block_ms=None) == 2  # the garbage never decoded into a batch
    assert (worker.scored_count, worker.dead_count) == (1, 1)
    assert [m.rollout_batch_id for m in scored_messages(broker)] == [good.rollout_batch_id]
    assert broker.pending("rollouts", "reward") == 0

    dead = broker.dead_letters("rollouts")
    assert len(dead) == 2
    unscorable = [letter for letter in dead if "scoring" in letter.error]
    assert len(unscorable) == 1
    assert "rollout_hidden" in unscorable[0].error and no_hidden.rollout_batch_id in unscorable[0].error
    # The dead letter keeps the whole batch, so it can be inspected or replayed.
    kept = decode(unscorable[0].payload, RolloutBatch)
    assert kept.rollout_batch_id == no_hidden.rollout_batch_id
    assert torch.equal(kept.rollout_tokens, no_hidden.rollout_tokens)


@pytest.mark.parametrize("error", [RuntimeError, SystemExit])
def test_a_reward_plugin_that_raises_dead_letters_the_batch_and_the_replica_goes_on(broker, make_batch, error):
    def faulty(inputs):
        raise error("plugin bug")

    register_reward("test_faulty_replica")(faulty)
    try:
        publish(broker, [make_batch(seed=1)])
        worker = RewardWorker(broker, "test_faulty_replica", consumer="reward-a")
        assert worker.run_once(count=10, block_ms=None) == 1
    finally:
        unregister_reward("test_faulty_replica")
    assert (worker.scored_count, worker.dead_count) == (0, 1)
    [dead] = broker.dead_letters("rollouts")
    assert f"{error.__name__}: plugin bug" in dead.error
    assert broker.pending("rollouts", "reward") == 0
    good = make_batch(seed=2)
    publish(broker, [good])
    assert RewardWorker(broker, "cosine", consumer="reward-a").run_once(count=10, block_ms=None) == 1
    assert [m.rollout_batch_id for m in scored_messages(broker)] == [good.rollout_batch_id]


def test_run_stops_when_the_run_is_stopped(broker):
    worker = RewardWorker(broker, "binary", consumer="reward-a")
    broker.request_stop("test")
    thread = threading.Thread(target=worker.run, args=(threading.Event(),), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_bad_configuration_is_refused(broker):
    with pytest.raises(ValueError, match="unknown reward_type 'nope'"):
        RewardWorker(broker, "nope", consumer="reward-a")
    with pytest.raises(ValueError, match="consumer"):
        RewardWorker(broker, "cosine", consumer="")
    with pytest.raises(ValueError, match="must differ"):
        RewardWorker(broker, "cosine", rollout_stream="x", scored_stream="x", consumer="reward-a")


def test_an_entry_is_held_while_it_is_scored(broker, make_batch):
    """The replica marks the entries it read as held until they are handled (the service then keeps them fresh
    in Redis), and only for that long: a slow task reward is not reclaimed by other replicas as a dead one's, nor
    are the entries of the same read waiting their turn."""
    publish(broker, [make_batch(seed=1)])
    active: set[str] = set()
    seen_while_scoring: list[set[str]] = []

    @contextmanager
    def holding(entry_id):
        active.add(entry_id)
        try:
            yield
        finally:
            active.discard(entry_id)

    def decode(tokens):
        seen_while_scoring.append(set(active))
        return "text"

    worker = RewardWorker(broker, "substring_match", consumer="reward-a", decode=decode, holding=holding)
    assert worker.run_once(block_ms=None) == 1
    assert seen_while_scoring and all(len(held) == 1 for held in seen_while_scoring)
    assert not active and broker.pending("rollouts", "reward") == 0

    # A read of several: each is held from the start, not only while its own turn comes.
    publish(broker, [make_batch(seed=seed) for seed in (2, 3, 4)])
    seen_while_scoring.clear()
    assert worker.run_once(count=3, block_ms=None) == 3
    assert seen_while_scoring and all(len(held) == 3 for held in seen_while_scoring)
    assert not active and broker.pending("rollouts", "reward") == 0


class FakeClock:
    """A perf_counter that moves only when told to: every duration in the test is a known number."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SlowPublishBroker(Broker):
    """A real broker whose publishing and acknowledging take known (fake-clock) time: a busy Redis."""

    PUBLISH_S = 8.0
    ACK_S = 16.0

    def __init__(self, *args, clock: FakeClock, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock

    def publish(self, stream, message, maxlen=None, approximate=True):
        self.clock.advance(self.PUBLISH_S)
        return super().publish(stream, message, maxlen=maxlen, approximate=approximate)

    def ack(self, stream, group, ids):
        self.clock.advance(self.ACK_S)
        return super().ack(stream, group, ids)


def test_the_latency_metric_times_the_scoring_alone(broker, make_batch, monkeypatch):
    """As the HTTP API measures it: publishing and acknowledging are Redis's time, not the reward's."""
    clock = FakeClock()
    # Only the reward worker's clock is fake (its run loop's monotonic stays real; run_once does not use it).
    monkeypatch.setattr(reward_worker, "time", SimpleNamespace(perf_counter=clock, monotonic=time.monotonic))
    scoring_s = iter([0.25, 0.5])  # what scoring each batch takes (exact in binary floating point)
    real_score_batch = reward_worker.score_batch

    def timed_score_batch(*args, **kwargs):
        scored = real_score_batch(*args, **kwargs)
        clock.advance(next(scoring_s))
        return scored

    monkeypatch.setattr(reward_worker, "score_batch", timed_score_batch)
    slow = SlowPublishBroker(broker.client, broker.namespace, clock=clock)
    publish(broker, [make_batch(seed=1), make_batch(seed=2)])
    metrics = Metrics()
    worker = RewardWorker(slow, "cosine", consumer="reward-a", metrics=metrics)
    started = clock()
    assert worker.run_once(count=2, block_ms=None) == 2
    sample = metrics.registry.get_sample_value
    assert sample("refine_reward_latency_seconds_count") == 2
    # Exactly the two scorings (0.25 s + 0.5 s); any publish (8 s) or ack (16 s) inside would show.
    assert sample("refine_reward_latency_seconds_sum") == 0.75
    assert sample("refine_reward_latency_seconds_bucket", {"le": "0.25"}) == 1  # one observation each, not
    assert sample("refine_reward_latency_seconds_bucket", {"le": "0.5"}) == 2  # a total split in two
    # The slow publish and ack did run (and advanced the clock) for both batches.
    assert clock() - started == 0.75 + 2 * (SlowPublishBroker.PUBLISH_S + SlowPublishBroker.ACK_S)
    assert sample("refine_scored_batches_total") == 2
    assert broker.pending("rollouts", "reward") == 0


def test_a_ground_truth_that_decodes_to_nothing_scores_zero_not_a_full_score(broker, make_batch):
    """The replica's text comes from tokens: a ground truth of blank lines or special ids decodes to blank text,
    which every rollout contains. Such a rollout scores 0 and the batch is scored: a dead letter would end the
    run on ordinary document text."""
    source = make_batch(seed=1)
    publish(broker, [source])
    decode = lambda ids: "\n\n" if ids == source.ground_truth_tokens[0].tolist() else "some answer"  # noqa: E731
    worker = RewardWorker(broker, "substring_match", consumer="reward-a", decode=decode)
    assert worker.run_once(block_ms=None) == 1
    assert (worker.scored_count, worker.dead_count) == (1, 0)
    [scored] = scored_messages(broker)
    rewards = scored.rewards.tolist()
    assert rewards[0] == 0.0 and rewards[1:] == [1.0] * (len(rewards) - 1)


# B=2 documents x c=2 positions x n=2 samples = 8 rollouts of k=3 tokens, hidden size D=4 (float32).
OVERSIZE_SETTINGS = ("train.batch_size=2 x refine.num_chunks=2 x refine.num_samples=2 = 8 rollouts of "
                     "refine.rollout_len=3 tokens, each token with 2 hidden states (rollout_hidden, "
                     "ground_truth_hidden) of model.hidden_size=4 float32 values: 2 x 8 x 3 x 4 x 4 bytes = 768 bytes")


def over_the_limit(broker: Broker, batch: RolloutBatch) -> Broker:
    """The run's broker with a codec limit (services.codec.CodecLimits) that `batch` fits and its scored
    batch (the same plus one reward per rollout) does not."""
    return Broker(broker.client, broker.namespace, limits=CodecLimits(max_message_bytes=len(encode(batch)) + 16))


def test_a_scored_batch_over_the_message_limit_dead_letters_its_rollouts_at_once(broker, make_batch):
    """A scored batch the codec refuses can never be published: the replica does not fail (its actor would
    be restarted and the batch reclaimed until max_deliveries), it dead-letters the rollouts entry once,
    with the reason naming the message, its size, the limit and the settings that size it, acknowledged;
    its loop goes on."""
    batch = make_batch(seed=1, docs=2, chunks=2, samples=2, k=3, dim=4)
    publish(broker, [batch])
    small = over_the_limit(broker, batch)
    limit = small.limits.max_message_bytes
    worker = RewardWorker(small, "cosine", consumer="reward-a")
    assert worker.run_once(block_ms=None) == 1  # no CodecError escapes
    [dead] = broker.dead_letters("rollouts")
    assert decode(dead.payload, RolloutBatch).rollout_batch_id == batch.rollout_batch_id  # the input
    assert dead.error.startswith(f"reward replica reward-a could not publish the ScoredBatch of rollout batch "
                                 f"{batch.rollout_batch_id}: ")
    size = int(re.search(rf"message ScoredBatch is (\d+) bytes, over the limit max_message_bytes={limit} ",
                         dead.error).group(1))
    assert size > limit
    assert "services.codec.CodecLimits.max_message_bytes, 268435456 = 256 MiB by default" in dead.error
    assert OVERSIZE_SETTINGS in dead.error
    assert broker.pending("rollouts", "reward") == 0 and broker.length("scored") == 0
    assert worker.reclaim(min_idle_ms=0) == 0  # acknowledged: nothing to take over
    assert (worker.scored_count, worker.dead_count) == (0, 1)

    # The replica's loop (what the Ray actor runs) stays up through the next such batch.
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"block_ms": 100}, daemon=True)
    thread.start()
    try:
        publish(broker, [make_batch(seed=2, docs=2, chunks=2, samples=2, k=3, dim=4)])
        wait_for(lambda: len(broker.dead_letters("rollouts")) == 2 or not thread.is_alive())
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert worker.dead_count == 2 and broker.pending("rollouts", "reward") == 0


def test_the_run_ends_with_the_reason_of_a_scored_batch_over_the_message_limit(broker, make_batch,
                                                                               dead_letter_error, tmp_path):
    """The orchestrator ends the run on that dead letter with an error quoting it: the message type, its
    size, the limit and its setting, and the run settings that size it."""
    batch = make_batch(seed=1, docs=2, chunks=2, samples=2, k=3, dim=4)
    publish(broker, [batch])
    assert RewardWorker(over_the_limit(broker, batch), "cosine", consumer="reward-a").run_once(block_ms=None) == 1
    text = dead_letter_error(load_config(None, [f"train.out_dir={tmp_path / 'run'}"]), broker.namespace)
    assert text.startswith("a message of stream 'rollouts' could not be used (entry ")
    assert re.search(r"message ScoredBatch is \d+ bytes, over the limit max_message_bytes=\d+ ", text)
    assert "services.codec.CodecLimits.max_message_bytes" in text
    assert OVERSIZE_SETTINGS in text
