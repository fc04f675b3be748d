"""Broker on a real Redis: delivery, acknowledgement, reclaim, dead letters, exactly-once, control."""

import threading
import time

import msgpack
import pytest
import redis
import torch

from services.broker import Broker
from services.codec import TENSOR_EXT_CODE, encode
from services.messages import DocumentBatch, RolloutBatch
from services.redis_server import connect
from services.resilience import RedisStateLost

STREAM, GROUP = "documents", "rollout-workers"


def documents(tag: str, batch_id: str | None = None) -> DocumentBatch:
    extra = {"batch_id": batch_id} if batch_id else {}
    return DocumentBatch(doc_ids=[tag], token_ids=torch.arange(8).reshape(1, 8), lengths=torch.tensor([8]), **extra)


def test_publish_consume_ack(broker: Broker) -> None:
    sent = [documents(f"d{i}") for i in range(3)]
    ids = [broker.publish(STREAM, m) for m in sent]
    assert len(set(ids)) == 3 and broker.length(STREAM) == 3

    first = broker.consume(STREAM, GROUP, "c1", DocumentBatch, count=2)
    assert [entry_id for entry_id, _ in first] == ids[:2]
    assert [m.batch_id for _, m in first] == [m.batch_id for m in sent[:2]]
    assert torch.equal(first[0][1].token_ids, sent[0].token_ids)
    assert broker.pending(STREAM, GROUP) == 2

    assert broker.ack(STREAM, GROUP, [ids[0], ids[1]]) == 2
    assert broker.ack(STREAM, GROUP, [ids[0]]) == 0  # already acknowledged
    assert broker.pending(STREAM, GROUP) == 0

    rest = broker.consume(STREAM, GROUP, "c1", DocumentBatch, count=10)
    assert [m.doc_ids for _, m in rest] == [["d2"]]
    assert broker.consume(STREAM, GROUP, "c1", DocumentBatch, count=10) == []
    assert broker.length(STREAM) == 3  # acknowledged entries stay until trimmed


def test_group_splits_work_and_groups_are_independent(broker: Broker) -> None:
    for i in range(6):
        broker.publish(STREAM, documents(f"d{i}"))
    a = broker.consume(STREAM, GROUP, "a", DocumentBatch, count=3)
    b = broker.consume(STREAM, GROUP, "b", DocumentBatch, count=10)
    assert len(a) == 3 and len(b) == 3
    assert not {i for i, _ in a} & {i for i, _ in b}
    other = broker.consume(STREAM, "metrics", "m", DocumentBatch, count=10)
    assert len(other) == 6


def test_group_created_from_now_skips_backlog(broker: Broker) -> None:
    broker.publish(STREAM, documents("old"))
    broker.ensure_group(STREAM, "late", start_id="$")
    broker.ensure_group(STREAM, "late", start_id="0")  # idempotent: does not reset the group
    broker.publish(STREAM, documents("new"))
    got = broker.consume(STREAM, "late", "c", DocumentBatch, count=10)
    assert [m.doc_ids for _, m in got] == [["new"]]


def test_blocking_consume_wakes_on_publish(broker: Broker, redis_url: str, namespace: str) -> None:
    assert broker.consume(STREAM, GROUP, "c", DocumentBatch, block_ms=50) == []
    publisher = Broker(connect(redis_url), namespace)
    timer = threading.Timer(0.2, lambda: publisher.publish(STREAM, documents("late")))
    timer.start()
    try:
        got = broker.consume(STREAM, GROUP, "c", DocumentBatch, block_ms=5_000)  # below the socket timeout (10 s)
    finally:
        timer.join()
    assert [m.doc_ids for _, m in got] == [["late"]]


def test_block_longer_than_socket_timeout_is_refused(redis_url: str, namespace: str) -> None:
    broker = Broker(connect(redis_url, socket_timeout_s=1.0), namespace)
    with pytest.raises(ValueError, match=r"block_ms=5000 must be below the client's socket timeout \(1.0s\)"):
        broker.consume(STREAM, GROUP, "c", DocumentBatch, block_ms=5000)
    with pytest.raises(ValueError, match="block_ms must be positive"):
        broker.consume(STREAM, GROUP, "c", DocumentBatch, block_ms=0)


def test_dead_consumer_entries_are_reclaimed(broker: Broker) -> None:
    for i in range(3):
        broker.publish(STREAM, documents(f"d{i}"))
    held = broker.consume(STREAM, GROUP, "dies", DocumentBatch, count=2)
    # The consumer "dies": it never acknowledges.
    assert broker.reclaim(STREAM, GROUP, "survivor", DocumentBatch, min_idle_ms=10**9) == []
    time.sleep(0.05)
    taken = broker.reclaim(STREAM, GROUP, "survivor", DocumentBatch, min_idle_ms=10)
    assert [(i, m.batch_id) for i, m in taken] == [(i, m.batch_id) for i, m in held]
    details = broker.client.xpending_range(broker.key("stream", STREAM), GROUP, "-", "+", 10)
    assert {d["consumer"] for d in details} == {b"survivor"}
    broker.ack(STREAM, GROUP, [i for i, _ in taken])
    assert broker.pending(STREAM, GROUP) == 0
    # The unread entry is still delivered normally.
    assert [m.doc_ids for _, m in broker.consume(STREAM, GROUP, "survivor", DocumentBatch)] == [["d2"]]


def test_reclaim_reads_past_a_page_of_live_entries_to_the_idle_one(broker: Broker) -> None:
    """Without this, reclaim could stop after one XAUTOCLAIM page: Redis scans at most 10 * count pending entries
    a call, so a dead consumer's entry behind 12 live ones would never be taken over at count=1."""
    for i in range(13):
        broker.publish(STREAM, documents(f"d{i}"))
    live = broker.consume(STREAM, GROUP, "live", DocumentBatch, count=12)
    [(dead_id, dead)] = broker.consume(STREAM, GROUP, "dies", DocumentBatch, count=1)
    # The dead consumer's entry has been idle a minute (XCLAIM's IDLE sets that, no waiting); the 12 ahead of it
    # in the pending list were just delivered.
    broker.client.xclaim(broker.key("stream", STREAM), GROUP, "dies", 0, [dead_id], idle=60_000, justid=True)
    taken = broker.reclaim(STREAM, GROUP, "survivor", DocumentBatch, min_idle_ms=30_000, count=1)
    assert [(entry_id, message.doc_ids) for entry_id, message in taken] == [(dead_id, dead.doc_ids)]
    details = broker.client.xpending_range(broker.key("stream", STREAM), GROUP, "-", "+", 20)
    owners = {d["message_id"].decode(): d["consumer"] for d in details}
    assert owners[dead_id] == b"survivor" and [owners[entry_id] for entry_id, _ in live] == [b"live"] * 12


def test_entry_redelivered_too_often_goes_to_dead_letters(broker: Broker) -> None:
    broker.publish(STREAM, documents("poison"))
    broker.consume(STREAM, GROUP, "c0", DocumentBatch)
    for consumer in ("c1", "c2"):
        time.sleep(0.02)
        assert len(broker.reclaim(STREAM, GROUP, consumer, DocumentBatch, min_idle_ms=1, max_deliveries=3)) == 1
    time.sleep(0.02)
    assert broker.reclaim(STREAM, GROUP, "c3", DocumentBatch, min_idle_ms=1, max_deliveries=3) == []
    assert broker.pending(STREAM, GROUP) == 0
    [dead] = broker.dead_letters(STREAM)
    assert "delivered 4 times, over max_deliveries=3" in dead.error


def test_undecodable_entries_are_dead_lettered_not_returned(broker: Broker) -> None:
    good = broker.publish(STREAM, documents("good"))
    stream_key = broker.key("stream", STREAM)
    bad = broker.client.xadd(stream_key, {b"m": b"\x80\x04garbage"}).decode()
    broker.client.xadd(stream_key, {b"other": b"no payload"})
    wrong_type = broker.publish(STREAM, RolloutBatch(
        document_batch_id="x", policy_version=0, worker_id="w", num_samples=1, rollout_len=1,
        positions=torch.ones(1, 1, dtype=torch.long), entropies=torch.zeros(1, 1),
        rollout_tokens=torch.zeros(1, 1, dtype=torch.long), behaviour_logprobs=torch.zeros(1, 1),
    ))
    got = broker.consume(STREAM, GROUP, "c", DocumentBatch, count=10)
    assert [i for i, _ in got] == [good]
    assert broker.pending(STREAM, GROUP) == 1  # only the good one awaits its ack
    dead = broker.dead_letters(STREAM)
    assert [d.entry_id for d in dead][0] == bad and wrong_type == dead[2].entry_id
    assert dead[0].payload == b"\x80\x04garbage" and "not a valid message" in dead[0].error
    assert "no payload" in dead[1].error
    assert "holds a 'RolloutBatch', expected 'DocumentBatch'" in dead[2].error


def test_an_undecodable_tensor_is_dead_lettered_and_the_good_entries_of_the_read_returned(broker: Broker) -> None:
    """A zero-element tensor with huge dimensions once made torch raise inside decode: the whole read
    failed, all three entries stayed pending and nothing was dead-lettered."""
    first = broker.publish(STREAM, documents("first"))
    envelope = msgpack.unpackb(encode(documents("bad")), raw=False)
    envelope["body"]["token_ids"] = msgpack.ExtType(
        TENSOR_EXT_CODE, msgpack.packb(["int64", [0, 2**31, 2**31, 2**31], b""], use_bin_type=True))
    payload = msgpack.packb(envelope, use_bin_type=True)
    bad = broker.client.xadd(broker.key("stream", STREAM), {b"m": payload, b"t": b"DocumentBatch"}).decode()
    last = broker.publish(STREAM, documents("last"))
    got = broker.consume(STREAM, GROUP, "c", DocumentBatch, count=3)
    assert [entry_id for entry_id, _ in got] == [first, last]
    assert [message.doc_ids for _, message in got] == [["first"], ["last"]]
    assert broker.pending(STREAM, GROUP) == 2  # the bad one was acknowledged with its dead letter
    [dead] = broker.dead_letters(STREAM)
    assert dead.entry_id == bad and dead.payload == payload
    assert "field token_ids: shape [0, 2147483648, 2147483648, 2147483648] has a dimension" in dead.error


def test_a_decoder_failure_other_than_codec_error_costs_only_its_entry(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.broker

    first = broker.publish(STREAM, documents("first"))
    broker.publish(STREAM, documents("crash"))
    last = broker.publish(STREAM, documents("last"))
    real_decode = services.broker.decode

    def flaky_decode(payload: bytes, cls: type, limits: object) -> object:
        message = real_decode(payload, cls, limits)
        if message.doc_ids == ["crash"]:
            raise RuntimeError("decoder bug")
        return message

    monkeypatch.setattr(services.broker, "decode", flaky_decode)
    got = broker.consume(STREAM, GROUP, "c", DocumentBatch, count=3)
    assert [entry_id for entry_id, _ in got] == [first, last]
    [dead] = broker.dead_letters(STREAM)
    assert dead.error == "RuntimeError: decoder bug"


def test_entries_trimmed_while_pending_are_released(broker: Broker) -> None:
    for i in range(3):
        broker.publish(STREAM, documents(f"d{i}"))
    broker.consume(STREAM, GROUP, "dies", DocumentBatch, count=3)
    assert broker.trim(STREAM, maxlen=1) == 2
    time.sleep(0.02)
    taken = broker.reclaim(STREAM, GROUP, "survivor", DocumentBatch, min_idle_ms=1)
    assert [m.doc_ids for _, m in taken] == [["d2"]]
    assert broker.pending(STREAM, GROUP) == 1  # the trimmed two are released, d2 awaits its ack
    broker.ack(STREAM, GROUP, [taken[0][0]])
    assert broker.pending(STREAM, GROUP) == 0


def test_maxlen_trims_oldest(broker: Broker) -> None:
    for i in range(10):
        broker.publish(STREAM, documents(f"d{i}"), maxlen=4, approximate=False)
    assert broker.length(STREAM) == 4
    got = broker.consume(STREAM, GROUP, "c", DocumentBatch, count=10)
    assert [m.doc_ids[0] for _, m in got] == ["d6", "d7", "d8", "d9"]


def test_group_is_recreated_if_the_stream_vanishes(broker: Broker) -> None:
    broker.publish(STREAM, documents("a"))
    assert len(broker.consume(STREAM, GROUP, "c", DocumentBatch)) == 1
    broker.client.delete(broker.key("stream", STREAM))
    broker.publish(STREAM, documents("b"))
    assert [m.doc_ids for _, m in broker.consume(STREAM, GROUP, "c", DocumentBatch)] == [["b"]]


def test_a_read_blocked_on_a_stream_that_is_deleted_and_made_again_meanwhile_goes_on(broker: Broker,
                                                                                      wait_for_blocked_read) -> None:
    """FLUSHALL (or a deleted key) under a blocked XREADGROUP, then a publish that makes the stream again: Redis
    answers UNBLOCKED, which ended the role that read (the learner, a worker, the driver itself) with a raw error.
    The group is made again, as for NOGROUP, and the read goes on."""
    broker.ensure_group(STREAM, GROUP)
    outcome: list = []

    def read() -> None:
        try:
            outcome.append(broker.consume(STREAM, GROUP, "c", DocumentBatch, block_ms=3000))
        except redis.ResponseError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    wait_for_blocked_read(broker.client)
    # The publish that makes the stream again (a role's, after the flush) lands in the same transaction: the read
    # is retried on a stream that exists (one that does not is not made again: the test below).
    key = broker.key("stream", STREAM)
    with broker.client.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.xadd(key, {b"m": encode(documents("lost")), b"t": b"DocumentBatch"})
        pipe.execute()
    reader.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
    broker.publish(STREAM, documents("after"))
    assert ["after"] in [m.doc_ids for _, m in broker.consume(STREAM, GROUP, "c", DocumentBatch, count=10)]


def test_a_stream_deleted_under_a_blocked_read_is_not_made_again(broker: Broker, redis_url: str, namespace: str,
                                                                  wait_for_blocked_read) -> None:
    """A role still reading when its run's namespace is deleted (a second Ctrl-C: Ray kills actors asynchronously)
    made its consumer group again with the stream, and the run's end left that key in Redis. The stream is not
    made again: the read raises the run's lost state, which ends the role's loop."""
    broker.ensure_group(STREAM, GROUP)  # the run's set-up
    reader = Broker(connect(redis_url), namespace)
    deleted = threading.Event()
    outcome: list = []

    def role_loop() -> None:
        reads_after = 0
        try:
            while reads_after < 2:  # two reads that started after the deletion: enough to make it again
                started_after = deleted.is_set()
                reader.consume(STREAM, GROUP, "c", DocumentBatch, block_ms=200)
                reads_after += started_after
        except RedisStateLost as exc:
            outcome.append(exc)

    loop = threading.Thread(target=role_loop)
    loop.start()
    wait_for_blocked_read(broker.client)
    broker.delete_namespace()  # the run's end
    deleted.set()
    loop.join(timeout=30)
    assert not loop.is_alive()
    assert list(broker.client.scan_iter(match=f"{namespace}:*")) == []
    assert len(outcome) == 1, "the role read on from a stream it made again"
    assert str(outcome[0]) == (f"stream '{namespace}:stream:{STREAM}' (read by consumer group '{GROUP}') no longer "
                               f"exists")


def test_a_roles_broker_makes_no_stream(broker: Broker, redis_url: str, namespace: str) -> None:
    """A role's reads and publishes never make a stream (the run's set-up made them all): one that does not exist
    is the run's state gone."""
    role = Broker(connect(redis_url), namespace, make_streams=False)
    with pytest.raises(RedisStateLost, match=rf"^stream '{namespace}:stream:{STREAM}' \(read by consumer group "
                                         rf"'{GROUP}'\) no longer exists$"):
        role.consume(STREAM, GROUP, "c", DocumentBatch)
    with pytest.raises(RedisStateLost, match=rf"^stream '{namespace}:stream:{STREAM}' no longer exists$"):
        role.publish(STREAM, documents("a"))
    assert list(broker.client.scan_iter(match=f"{namespace}:*")) == []
    broker.ensure_group(STREAM, GROUP)  # the set-up makes it
    role.publish(STREAM, documents("b"))
    assert [m.doc_ids for _, m in role.consume(STREAM, GROUP, "c", DocumentBatch)] == [["b"]]


@pytest.mark.parametrize("error", ["UNBLOCKED the stream key no longer exists",
                                   "NOGROUP No such key 'documents' or consumer group 'rollout-workers'"])
def test_a_read_the_server_ends_for_a_lost_stream_or_group_is_made_again_and_retried(broker: Broker,
                                                                                     error: str) -> None:
    # Redis 7.0 answers UNBLOCKED in the case above (the test session's server may answer otherwise).
    calls: list[str] = []

    def command() -> list:
        calls.append("read")
        if len(calls) == 1:
            raise redis.ResponseError(error)
        return []

    assert broker._with_group(STREAM, GROUP, command) == [] and len(calls) == 2
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        broker._with_group(STREAM, GROUP, lambda: (_ for _ in ()).throw(redis.ResponseError("WRONGTYPE other")))


def test_learner_loop_trains_once_on_duplicates_and_redeliveries(broker: Broker) -> None:
    """A message published twice and redelivered after a crash is still used exactly once."""
    batches = [documents(f"d{i}") for i in range(4)]
    for b in batches:
        broker.publish(STREAM, b)
    broker.publish(STREAM, batches[1])  # producer retried after a lost reply
    trained: list[str] = []

    def learner_step(consumer: str, entries) -> None:
        for entry_id, message in entries:
            if broker.already_consumed("learner", message.batch_id):
                broker.ack(STREAM, GROUP, [entry_id])
                continue
            trained.append(message.batch_id)
            broker.ack_consumed(STREAM, GROUP, [entry_id], "learner", [message.batch_id])

    # The first learner takes two entries and crashes after training on the first without acking.
    crashed = broker.consume(STREAM, GROUP, "learner-a", DocumentBatch, count=2)
    trained.append(crashed[0][1].batch_id)
    broker.ack_consumed(STREAM, GROUP, [], "learner", [crashed[0][1].batch_id])  # its update was durably checkpointed
    time.sleep(0.02)
    learner_step("learner-b", broker.reclaim(STREAM, GROUP, "learner-b", DocumentBatch, min_idle_ms=1))
    learner_step("learner-b", broker.consume(STREAM, GROUP, "learner-b", DocumentBatch, count=10))
    assert sorted(trained) == sorted(b.batch_id for b in batches)
    assert broker.pending(STREAM, GROUP) == 0


def test_ack_consumed_records_and_acks_together(broker: Broker) -> None:
    entry = broker.publish(STREAM, documents("x"))
    [(entry_id, message)] = broker.consume(STREAM, GROUP, "c", DocumentBatch)
    assert broker.ack_consumed(STREAM, GROUP, [entry_id], "learner", [message.batch_id]) == 1
    assert entry_id == entry and broker.already_consumed("learner", message.batch_id)
    assert broker.pending(STREAM, GROUP) == 0


def test_stop_and_heartbeats(broker: Broker) -> None:
    assert broker.stop_requested() is None
    broker.request_stop("loss diverged")
    assert broker.stop_requested() == "loss diverged"

    broker.heartbeat("rollout", "w0")
    broker.heartbeat("rollout", "w1")
    assert broker.alive("rollout", max_age_s=60) == ["w0", "w1"]
    assert set(broker.heartbeats("rollout")) == {"w0", "w1"}
    # w0 last beat 100 s ago by the server's clock (written directly: no sleeping in tests).
    seconds, micros = broker.client.time()
    broker.client.zadd(broker.key("heartbeat", "rollout"), {"w0": seconds + micros / 1e6 - 100})
    assert broker.alive("rollout", max_age_s=50) == ["w1"]
    assert broker.heartbeats("rollout")["w0"] >= 100
    broker.forget("rollout", "w1")
    assert broker.alive("rollout", max_age_s=1000) == ["w0"]
    assert broker.alive("learner", max_age_s=60) == []


def test_namespaces_are_isolated(broker: Broker, redis_client: redis.Redis, namespace: str) -> None:
    other = Broker(redis_client, namespace + "-other")
    try:
        broker.publish(STREAM, documents("mine"))
        broker.request_stop("mine")
        broker.ack_consumed(STREAM, GROUP, [], "learner", ["m"])
        assert other.length(STREAM) == 0 and other.stop_requested() is None
        assert not other.already_consumed("learner", "m")
        assert other.consume(STREAM, GROUP, "c", DocumentBatch) == []
    finally:
        other.delete_namespace()
    assert broker.length(STREAM) == 1
    assert broker.delete_namespace() > 0
    assert redis_client.keys(f"{namespace}:*") == []


def test_bad_arguments_are_refused(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="namespace"):
        Broker(redis_client, "has space")
    with pytest.raises(ValueError, match="a ':' would reach into other runs' keys"):
        Broker(redis_client, "team:run2")
    with pytest.raises(ValueError, match="decode_responses=False"):
        Broker(redis.Redis(decode_responses=True), "ns")


def test_a_claim_whose_reply_was_lost_and_sent_again_is_the_runs_own(broker: Broker, redis_client: redis.Redis,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py's retry re-sends a command whose reply a dropped connection lost: the second SET NX found the first's
    claim, and the run refused to start, naming itself as the holder."""
    set_once = broker.client.set

    def set_then_sent_again(*args, **kwargs):
        set_once(*args, **kwargs)  # the server ran it; its reply was lost
        return set_once(*args, **kwargs)

    monkeypatch.setattr(broker.client, "set", set_then_sent_again)
    assert broker.claim("run-a", ttl_s=30) is None and broker.claimed_by() == "run-a"
    assert broker.claim("run-b", ttl_s=30) == "run-a"  # another run is still refused


def test_a_namespace_is_claimed_by_one_run_at_a_time(broker: Broker, redis_client: redis.Redis) -> None:
    assert broker.claim("run-a", ttl_s=30) is None and broker.claimed_by() == "run-a"
    assert broker.claim("run-b", ttl_s=30) == "run-a"  # refused, naming the holder
    assert broker.renew_claim("run-a", ttl_s=30) is None
    assert broker.renew_claim("run-b", ttl_s=30) == "run-a"  # b never held it: a's stays
    assert broker.delete_namespace(keep=("claim",)) == 0 and broker.claimed_by() == "run-a"
    assert not broker.release_claim("run-b") and broker.claimed_by() == "run-a"
    assert broker.release_claim("run-a") and broker.claimed_by() is None
    # A claim that lapsed (its driver stalled) is taken again by its renewal while nobody else took it ...
    assert broker.claim("run-a", ttl_s=0.05) is None
    time.sleep(0.1)
    assert broker.claimed_by() is None and broker.renew_claim("run-a", ttl_s=30) is None
    assert 0 < redis_client.pttl(broker.key("claim")) <= 30_000
    # ... and another run's once it did.
    broker.take_over("run-b", ttl_s=30)
    assert broker.renew_claim("run-a", ttl_s=30) == "run-b" and broker.claimed_by() == "run-b"


def test_a_claim_lasts_its_ttl_from_each_claim_renewal_and_take_over(broker: Broker, redis_client: redis.Redis) -> None:
    """A claim that lapsed early would let a second run in beside a live one; one that never lapsed would keep a
    dead driver's namespace for good."""
    def lasts_ms() -> int:
        return int(redis_client.pttl(broker.key("claim")))

    assert broker.claim("run-a", ttl_s=30) is None
    assert 28_000 < lasts_ms() <= 30_000
    assert broker.renew_claim("run-a", ttl_s=600) is None  # a renewal of a live claim extends it
    assert 598_000 < lasts_ms() <= 600_000
    broker.take_over("run-b", ttl_s=45)
    assert 43_000 < lasts_ms() <= 45_000 and broker.claimed_by() == "run-b"
    assert broker.release_claim("run-b") and lasts_ms() == -2  # gone
