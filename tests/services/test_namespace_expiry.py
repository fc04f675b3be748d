"""Every key of a run's Redis namespace expires some time after its driver last refreshed it: a driver killed without
cleaning up (SIGKILL, a forced `ray job stop`, a node lost) leaves no streams or weights in a shared Redis for good
(real Redis; nothing of Ray starts)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import torch

from refine.config import RunConfig
from services.broker import Broker
from services.failures import ServiceError
from services.key_expiry import KeyExpiryKeeper
from services.messages import DocumentBatch
from services.orchestrator import Orchestrator
from services.progress import LearnerProgress, write_progress, write_published, write_recorded
from services.role import RoleRuntime
from services.streams import DOCUMENTS, ROLLOUT_GROUP, DocumentStore
from services.weight_store import RedisWeightStore

HOUR_MS = 3600 * 1000


def documents(batch_id: str) -> DocumentBatch:
    return DocumentBatch(batch_id=batch_id, doc_ids=["d"], token_ids=torch.ones(1, 8, dtype=torch.long),
                         lengths=torch.tensor([8]))


def state_dict() -> dict[str, torch.Tensor]:
    return {"w": torch.ones(4, 4)}


def write_as_the_roles_do(orchestrator: Orchestrator, broker: Broker) -> None:
    """The keys a run's roles write (streams, heartbeats, consumed sets, member records, the learner's progress, the
    orchestrator's records and stop flag, weights), here with no expiry of their own (`broker` has no key_ttl_s)."""
    for stream, group in orchestrator._groups():
        broker.ensure_group(stream, group)
    entry = broker.publish(DOCUMENTS, documents("docs-0"))
    broker.heartbeat("rollout_worker", "rollout_worker-0.0")
    broker.ack_consumed(DOCUMENTS, ROLLOUT_GROUP, [entry], "learner", ["docs-0.rollouts"])
    broker.client.hset(broker.key("members", "rollout_worker-0.0"), mapping={"node": "n"})
    write_progress(broker, LearnerProgress(step=1))
    write_published(broker, 1)
    write_recorded(broker, 1)
    broker.request_stop("interrupted")
    RedisWeightStore(broker.client, broker.namespace).publish(state_dict(), 0)


@contextmanager
def driver_with_the_roles_keys(redis_url: str, broker: Broker, tmp_path: Path, **service: object
                               ) -> Iterator[Orchestrator]:
    """A run's driver (nothing of Ray) holding `broker`'s namespace, whose streams it made, with the keys its roles
    write there (without an expiry of their own); `service`: settings of the service section."""
    config = RunConfig(train={"out_dir": str(tmp_path / "run")},
                       service={"metrics_discovery_dir": str(tmp_path / "prometheus"), **service})
    orchestrator = Orchestrator(config, None, redis_url, broker.namespace, resume=False, progress=False)
    try:
        orchestrator._claim_namespace()
        orchestrator._fresh_streams()
        orchestrator._keep_keys_alive()
        write_as_the_roles_do(orchestrator, broker)
        yield orchestrator
    finally:
        if orchestrator.key_expiry is not None:
            orchestrator.key_expiry.stop()
        orchestrator.client.close()


def ttls_ms(broker: Broker) -> dict[str, int]:
    return {name.decode(): int(broker.client.pttl(name))
            for name in broker.client.scan_iter(match=f"{broker.namespace}:*", count=1000)}


@pytest.fixture
def other_namespace(redis_client: redis.Redis) -> Iterator[Broker]:
    """Another run's namespace in the same Redis, with a stream and a record that have no expiry."""
    other = Broker(redis_client, f"test-{uuid.uuid4().hex[:12]}")
    other.ensure_group(DOCUMENTS, ROLLOUT_GROUP)
    write_published(other, 5)
    yield other
    other.delete_namespace()


def test_the_drivers_renewal_gives_every_key_of_its_namespace_an_expiry_and_no_other_namespace_one(
    redis_url: str, broker: Broker, namespace: str, other_namespace: Broker, tmp_path: Path
) -> None:
    with driver_with_the_roles_keys(redis_url, broker, tmp_path) as orchestrator:
        orchestrator.key_expiry.refresh()  # as its thread does every minute
        ttls = ttls_ms(broker)
        claim = ttls.pop(broker.key("claim"))
        assert 0 < claim <= orchestrator.claim_ttl_s * 1000  # the claim keeps its own, shorter TTL
        assert len(ttls) == 15, ttls  # 4 streams, 7 records, a version's 4 weight keys
        assert all(HOUR_MS // 2 < ttl <= HOUR_MS for ttl in ttls.values()), ttls  # an hour by default
        assert set(ttls_ms(other_namespace).values()) == {-1}  # another run's keys are left alone

        # A live driver's next refresh sets the expiry again (one that ran down, here by hand).
        stream = broker.key("stream", DOCUMENTS)
        broker.client.pexpire(stream, 5000)
        orchestrator.key_expiry.refresh()
        assert broker.client.pttl(stream) > HOUR_MS // 2

        # Rewrites keep a key's expiry, even by a broker without key_ttl_s (a plain SET drops it); the driver's own
        # writes, and a service learner's weights (gigabytes), bring one.
        write_published(broker, 2)
        write_recorded(broker, 2)
        broker.request_stop("shutdown")
        orchestrator.documents.put(documents("docs-1"))
        RedisWeightStore(broker.client, namespace, key_ttl_s=orchestrator.key_ttl_s).publish(state_dict(), 1)
        ttls = ttls_ms(broker)
        for name in ("orchestrator:published", "orchestrator:recorded", "control:stop", "document_batch:docs-1",
                     "weights:latest", "weights:versions", "weights:meta:1"):
            assert HOUR_MS // 2 < ttls[broker.key(*name.split(":"))] <= HOUR_MS, name
        blobs = [ttl for name, ttl in ttls.items() if ":weights:blob:" in name]
        assert len(blobs) == 2 and all(HOUR_MS // 2 < ttl <= HOUR_MS for ttl in blobs), ttls


def test_a_namespace_whose_driver_stops_refreshing_loses_its_keys_and_the_run_says_why(
    redis_url: str, broker: Broker, other_namespace: Broker, tmp_path: Path
) -> None:
    """A driver that stalls (suspended, swapped out) longer than the keys' time to live finds them gone: the run
    stops saying they expired, not that Redis lost them."""
    with driver_with_the_roles_keys(redis_url, broker, tmp_path, key_ttl_s=0.5) as orchestrator:
        orchestrator.published = 1
        orchestrator.key_expiry.refresh()
        assert len(ttls_ms(broker)) == 16
        orchestrator.key_expiry.stop()  # as a suspended driver's thread: no refresh
        time.sleep(1.0)  # for twice the keys' time to live
        assert list(ttls_ms(broker)) == [broker.key("claim")]  # which lapses after its own TTL
        assert ttls_ms(other_namespace) == {other_namespace.key("stream", DOCUMENTS): -1,
                                            other_namespace.key("orchestrator", "published"): -1}
        with pytest.raises(ServiceError, match=r"^Redis at redis://\S+ no longer holds this run's state \(its keys "
                                               r"expired: this driver did not refresh their expiry for \d+s, longer "
                                               r"than their 0.5s time to live \(service.key_ttl_s\), as it was "
                                               r"suspended or stalled\); the run stopped$"):
            orchestrator._check_redis_kept_the_run()


def test_a_driver_whose_loop_is_busy_longer_than_the_keys_ttl_keeps_them(
    redis_url: str, broker: Broker, tmp_path: Path
) -> None:
    """A step of the driver's loop that blocks (a large corpus built on the first batch took ~90 s) let every key of a
    live run expire, the claim's too: the roles made their streams again, and the run went on without its member
    records. The refresh runs on a thread of its own."""
    with driver_with_the_roles_keys(redis_url, broker, tmp_path, key_ttl_s=0.6) as orchestrator:
        time.sleep(2.0)  # the loop does nothing for over three times the keys' time to live
        ttls = ttls_ms(broker)
        assert len(ttls) == 16, ttls
        assert all(0 < ttl <= 600 for name, ttl in ttls.items() if name != broker.key("claim")), ttls
        orchestrator._check_redis_kept_the_run()


def test_a_stop_before_the_run_is_guarded_leaves_no_refresh_behind(
    redis_url: str, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C right after the run's streams were made (here at the line naming its namespace) left the refresh
    thread going: for an in-process caller that goes on, the run's keys then never expired."""
    config = RunConfig(train={"out_dir": str(tmp_path / "run")},
                       service={"metrics_discovery_dir": str(tmp_path / "prometheus")})
    orchestrator = Orchestrator(config, None, redis_url, broker.namespace, resume=False, progress=False)

    def ctrl_c(text: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(orchestrator, "_write_line", ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            orchestrator.run()
        assert [thread for thread in threading.enumerate() if thread.name == "refine-key-expiry"] == []
        ttls = ttls_ms(broker)
        assert broker.key("claim") not in ttls  # given up
        assert ttls and all(0 < ttl <= HOUR_MS for ttl in ttls.values()), ttls  # its streams: they expire
    finally:
        if orchestrator.key_expiry is not None:
            orchestrator.key_expiry.stop()
        orchestrator.client.close()


def test_a_gap_between_refreshes_before_the_state_was_found_whole_says_nothing_of_a_later_loss(
    redis_url: str, namespace: str
) -> None:
    """After one stall longer than the keys' TTL, a later loss of a run's state (a flushed Redis) was said to be
    their expiry."""
    keeper = KeyExpiryKeeper(redis_url, namespace, ttl_s=0.3)
    try:
        keeper.refresh()
        time.sleep(0.5)
        keeper.refresh()
        assert keeper.expired_after_s() >= 0.5  # the keys may have expired in that gap
        keeper.found_whole()  # the run checked: they had not, or were written again
        assert keeper.expired_after_s() is None
    finally:
        keeper.stop()


def test_a_redis_emptied_under_a_driver_that_refreshes_is_not_said_to_have_expired(
    redis_url: str, broker: Broker, tmp_path: Path
) -> None:
    with driver_with_the_roles_keys(redis_url, broker, tmp_path) as orchestrator:
        orchestrator.published = 1
        orchestrator._housekeeping()
        broker.delete_namespace(keep=("claim",))  # flushed, or restarted without persistence
        with pytest.raises(ServiceError, match=r"lost this run's state \(its streams and records are gone, or its "
                                               r"last writes: restarted without persistence, flushed"):
            orchestrator._check_redis_kept_the_run()


def test_a_service_roles_writes_bring_their_expiry_before_any_refresh(redis_url: str, namespace: str) -> None:
    """Keys a role creates between two refreshes of the driver's (a minute apart): a driver killed meanwhile leaves
    none without an expiry."""
    runtime = RoleRuntime("rollout_worker", "rollout_worker-0.0", redis_url, namespace, None, serve_now=False,
                          key_ttl_s=600)  # its heartbeat and member record
    try:
        broker = runtime.broker
        broker.ensure_group(DOCUMENTS, ROLLOUT_GROUP)
        entry = broker.publish(DOCUMENTS, documents("docs-0"))
        broker.ack_consumed(DOCUMENTS, ROLLOUT_GROUP, [entry], "learner", ["docs-0.rollouts"])
        broker.dead_letter(DOCUMENTS, ROLLOUT_GROUP, entry, b"", "unusable")
        write_progress(broker, LearnerProgress(step=1))
        write_published(broker, 1)
        write_recorded(broker, 1)
        broker.request_stop("interrupted")
        DocumentStore(broker).put(documents("docs-1"))
        RedisWeightStore(broker.client, namespace, key_ttl_s=600).publish(state_dict(), 0)
        ttls = ttls_ms(broker)
        assert len(ttls) == 14, ttls  # 2 streams, 2 role records, 5 run records, a version's 4 weight keys, 1 batch
        assert all(300_000 < ttl <= 600_000 for ttl in ttls.values()), ttls
    finally:
        runtime.close()
