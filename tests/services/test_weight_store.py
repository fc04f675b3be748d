"""Versioned weights in a real Redis: chunked round trips, version order, pruning."""

import threading

import pytest
import redis
import torch

from services.weight_store import (
    RedisWeightStore,
    WeightStore,
    WeightStoreError,
    WeightVersionError,
    WeightVersionMissing,
)


def small_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(4, 4, generator=generator), "layer.bias": torch.randn(4, generator=generator)}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def test_redis_store_implements_the_interface(redis_client: redis.Redis, namespace: str) -> None:
    assert isinstance(RedisWeightStore(redis_client, namespace), WeightStore)


def test_fifty_megabyte_state_dict_round_trips_in_chunks(redis_client: redis.Redis, namespace: str) -> None:
    generator = torch.Generator().manual_seed(0)
    state = {
        "embed.weight": torch.randn(2048, 4096, generator=generator),  # 32 MiB float32
        "blocks.0.attn.weight": torch.randn(2048, 2048, generator=generator).to(torch.bfloat16),  # 8 MiB
        "blocks.0.mlp.weight": torch.randn(1024, 2048, generator=generator).to(torch.float16),  # 4 MiB
        "blocks.0.norm.weight": torch.ones(4096),
        "step": torch.tensor(12, dtype=torch.int64),
        "mask": torch.arange(100) % 3 == 0,
    }
    store = RedisWeightStore(redis_client, namespace, chunk_bytes=8 * 1024 * 1024)
    store.publish(state, version=1)
    version, fetched = store.fetch()
    assert version == 1
    assert_same(fetched, state)
    chunk_keys = redis_client.keys(f"{namespace}:weights:blob:*")
    assert len(chunk_keys) >= 6  # > 44 MiB in 8 MiB chunks
    # Committed chunks are permanent; only uncommitted uploads expire.
    assert all(redis_client.ttl(key) == -1 for key in chunk_keys)


def test_version_semantics_and_pruning(redis_client: redis.Redis, namespace: str) -> None:
    store = RedisWeightStore(redis_client, namespace, keep_last=2)
    assert store.latest_version() is None and store.versions() == []
    assert store.fetch_if_newer(None) is None
    with pytest.raises(WeightVersionMissing, match="no weights published"):
        store.fetch()

    states = {v: small_state(v) for v in (1, 2, 5)}
    for version, state in states.items():
        store.publish(state, version)
    assert store.latest_version() == 5
    assert store.versions() == [2, 5]
    assert_same(store.fetch(2)[1], states[2])
    assert_same(store.fetch()[1], states[5])
    with pytest.raises(WeightVersionMissing, match=r"weight version 1 is not available \(available: \[2, 5\]\)"):
        store.fetch(1)
    # The pruned version's chunks are gone too: only two versions' blobs remain.
    blobs = {key.split(b":")[3] for key in redis_client.keys(f"{namespace}:weights:blob:*")}
    assert len(blobs) == 2

    for stale in (5, 3):
        with pytest.raises(WeightVersionError, match=f"version {stale} is not newer than the latest version 5"):
            store.publish(small_state(9), stale)
    with pytest.raises(WeightVersionError, match="non-negative integer"):
        store.publish(small_state(9), -1)
    assert store.latest_version() == 5 and store.versions() == [2, 5]

    assert store.fetch_if_newer(5) is None
    newer = store.fetch_if_newer(2)
    assert newer is not None and newer[0] == 5


def test_another_reader_sees_only_committed_versions(redis_client: redis.Redis, redis_url: str, namespace: str) -> None:
    writer = RedisWeightStore(redis_client, namespace)
    reader = RedisWeightStore(redis.Redis.from_url(redis_url), namespace)
    writer.publish(small_state(1), 1)
    assert reader.latest_version() == 1
    assert_same(reader.fetch()[1], small_state(1))


def test_tied_and_view_tensors_are_stored(redis_client: redis.Redis, namespace: str) -> None:
    shared = torch.randn(8, 4)
    big = torch.randn(10, 4)
    state = {"embed.weight": shared, "lm_head.weight": shared, "slice": big[2:5]}
    store = RedisWeightStore(redis_client, namespace)
    store.publish(state, 0)
    _, fetched = store.fetch(0)
    assert torch.equal(fetched["embed.weight"], shared) and torch.equal(fetched["lm_head.weight"], shared)
    assert torch.equal(fetched["slice"], big[2:5])


def test_wait_for_version(redis_client: redis.Redis, redis_url: str, namespace: str) -> None:
    store = RedisWeightStore(redis_client, namespace)
    with pytest.raises(TimeoutError, match=r"weight version >= 1 not published within 0.05s"):
        store.wait_for_version(1, timeout_s=0.05)
    publisher = RedisWeightStore(redis.Redis.from_url(redis_url), namespace)
    timer = threading.Timer(0.1, lambda: publisher.publish(small_state(3), 3))
    timer.start()
    try:
        assert store.wait_for_version(2, timeout_s=30) == 3
    finally:
        timer.join()


def test_clear_removes_everything(redis_client: redis.Redis, namespace: str) -> None:
    store = RedisWeightStore(redis_client, namespace)
    store.publish(small_state(1), 1)
    store.publish(small_state(2), 2)
    store.clear()
    assert store.latest_version() is None and redis_client.keys(f"{namespace}:weights:*") == []
    store.publish(small_state(1), 1)  # a fresh start may reuse low versions
    assert store.latest_version() == 1


def test_bad_inputs_are_refused(redis_client: redis.Redis, namespace: str) -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be in"):
        RedisWeightStore(redis_client, namespace, chunk_bytes=600 * 1024 * 1024)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        RedisWeightStore(redis_client, namespace, keep_last=0)
    store = RedisWeightStore(redis_client, namespace)
    with pytest.raises(WeightStoreError, match=r"state_dict\['w'\] must be a torch tensor, got list"):
        store.publish({"w": [1.0]}, 1)  # type: ignore[dict-item]
    assert store.latest_version() is None
