"""Versioned weights in a real Redis: chunked round trips, version order, pruning, the bytes' digest."""

import hashlib
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import save as safetensors_save

from services.weight_store import (
    RedisWeightStore,
    WeightStore,
    WeightStoreError,
    WeightVersionError,
    WeightVersionMissing,
    state_dict_from_bytes,
    state_dict_to_bytes,
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


def test_a_version_committed_by_another_publisher_after_the_check_is_refused_at_the_commit(
        redis_client: redis.Redis, redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without this, the commit script could accept a version equal to the latest (>= weakened to >): two
    publishers racing with the same version would both pass the Python pre-check, and the second would
    silently replace the weights the first published, and that rollout workers may already have fetched."""
    store = RedisWeightStore(redis_client, namespace)
    rival = RedisWeightStore(redis.Redis.from_url(redis_url), namespace)
    store.publish(small_state(1), 1)
    checked = store.latest_version

    def latest_then_rival_publishes() -> int | None:
        latest = checked()  # the pre-check reads version 1 ...
        rival.publish(small_state(2), 2)  # ... then the rival commits version 2 before this publish does
        return latest

    monkeypatch.setattr(store, "latest_version", latest_then_rival_publishes)
    with pytest.raises(WeightVersionError, match="version 2 is not newer than the latest version 2"):
        store.publish(small_state(9), 2)
    monkeypatch.undo()
    assert store.latest_version() == 2 and store.versions() == [1, 2]
    assert_same(store.fetch(2)[1], small_state(2))  # the rival's weights, unchanged
    blobs = {key.split(b":")[3] for key in redis_client.keys(f"{namespace}:weights:blob:*")}
    assert len(blobs) == 2  # the refused upload's chunks are deleted


def test_a_commit_sent_again_after_its_reply_was_lost_keeps_the_version_it_committed(
        redis_client: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py's retry re-sends a command whose reply a dropped connection lost (a Redis restart, a network blip).
    The re-sent commit was refused as stale, and publish then deleted the chunks of the version it had just
    committed: every worker's fetch failed on a missing chunk while the learner counted the publish done."""
    store = RedisWeightStore(redis_client, namespace)
    commit = store._commit

    def committed_then_sent_again(**kwargs: Any) -> Any:
        commit(**kwargs)  # the server ran it; its reply was lost
        return commit(**kwargs)  # the client's retry

    monkeypatch.setattr(store, "_commit", committed_then_sent_again)
    store.publish(small_state(1), 1)
    monkeypatch.undo()
    assert store.latest_version() == 1 and store.versions() == [1]
    assert_same(store.fetch(1)[1], small_state(1))
    # Another upload of the same version is still refused at the commit (its blob differs): see the test above.


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


def test_the_bytes_are_safetensors_own_for_one_dtype_of_each_width() -> None:
    """The store writes safetensors' layout itself (one copy of each tensor); with one dtype per element width its
    bytes are those safetensors.torch.save writes for the same tensors, each given its own contiguous memory."""
    shared = torch.randn(3, 5)
    state = {
        "embed.weight": shared, "lm_head.weight": shared,  # tied
        "transposed": torch.randn(4, 6).t(), "slice": torch.randn(10, 4)[2:5], "expanded": torch.ones(3).expand(2, 3),
        "step": torch.tensor(7), "empty": torch.empty(0, 4), "norm.weight": torch.randn(6).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]), "héad.ünicode": torch.randn(2),
    }
    expected = safetensors_save({name: tensor.contiguous().clone() for name, tensor in state.items()})
    assert bytes(state_dict_to_bytes(state)) == expected


def test_mixed_dtypes_of_one_width_round_trip_with_each_tensor_aligned() -> None:
    """float16, bfloat16 and int16 share a width (safetensors orders them its own way): the loader gets every tensor
    back, and each tensor's bytes start at a multiple of its element size. A dtype outside the written ones
    (float8) goes through safetensors' own writer."""
    generator = torch.Generator().manual_seed(0)
    state = {
        "half": torch.randn(3, generator=generator).half(), "brain": torch.randn(5, generator=generator).bfloat16(),
        "short": torch.arange(7, dtype=torch.int16), "byte": torch.arange(3, dtype=torch.uint8),
        "signed": torch.arange(-2, 3, dtype=torch.int8), "double": torch.randn(2, generator=generator).double(),
        "flag": torch.tensor([True]), "wide": torch.randn(2, 2, generator=generator),
    }
    data = bytes(state_dict_to_bytes(state))
    assert_same(state_dict_from_bytes(data), state)
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    for name, entry in header.items():
        assert (8 + header_size + entry["data_offsets"][0]) % state[name].element_size() == 0, name
    with_float8 = {**state, "scale": torch.randn(4, generator=generator).to(torch.float8_e4m3fn)}
    assert_same(state_dict_from_bytes(bytes(state_dict_to_bytes(with_float8))), with_float8)


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


def test_a_store_with_a_key_ttl_commits_a_versions_keys_with_that_expiry(redis_client: redis.Redis,
                                                                         namespace: str) -> None:
    """A service run's store: the driver refreshes the expiry of every key of its namespace, and a driver killed
    before its next refresh must not leave the newest weights (gigabytes) in Redis for good."""
    store = RedisWeightStore(redis_client, namespace, chunk_bytes=40, key_ttl_s=600)
    store.publish(small_state(1), 1)
    store.publish(small_state(2), 2)
    ttls = {name: redis_client.pttl(name) for name in redis_client.scan_iter(match=f"{namespace}:weights:*")}
    assert len(ttls) > 6 and all(300_000 < ttl <= 600_000 for ttl in ttls.values()), ttls
    assert_same(store.fetch(2)[1], small_state(2))
    store.clear()
    RedisWeightStore(redis_client, namespace, chunk_bytes=40).publish(small_state(3), 3)  # none: permanent
    assert {redis_client.pttl(name) for name in redis_client.scan_iter(match=f"{namespace}:weights:*")} == {-1}


@pytest.mark.parametrize("key_ttl_s", [None, 600])
def test_a_chunk_that_expired_before_the_commit_fails_the_publish(redis_client: redis.Redis, namespace: str,
                                                                  key_ttl_s: float | None) -> None:
    store = RedisWeightStore(redis_client, namespace, chunk_bytes=40, key_ttl_s=key_ttl_s)
    commit = store._commit

    def commit_after_a_chunk_expired(keys: list[str], args: list[Any]) -> Any:
        redis_client.delete(keys[4])
        return commit(keys=keys, args=args)

    store._commit = commit_after_a_chunk_expired
    with pytest.raises(WeightStoreError, match=r"publishing weight version 1 failed: MISSING chunk \S+:1 expired"):
        store.publish(small_state(1), 1)
    assert store.latest_version() is None and redis_client.keys(f"{namespace}:weights:*") == []


def test_bad_inputs_are_refused(redis_client: redis.Redis, namespace: str) -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be in"):
        RedisWeightStore(redis_client, namespace, chunk_bytes=600 * 1024 * 1024)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        RedisWeightStore(redis_client, namespace, keep_last=0)
    with pytest.raises(ValueError, match="key_ttl_s must be positive or None, got 0"):
        RedisWeightStore(redis_client, namespace, key_ttl_s=0)
    store = RedisWeightStore(redis_client, namespace)
    with pytest.raises(WeightStoreError, match=r"state_dict\['w'\] must be a torch tensor, got list"):
        store.publish({"w": [1.0]}, 1)  # type: ignore[dict-item]
    assert store.latest_version() is None


def corrupt_store(redis_client: redis.Redis, namespace: str) -> RedisWeightStore:
    """A store holding version 1 in several chunks, for a test to damage."""
    store = RedisWeightStore(redis_client, namespace, chunk_bytes=64)
    store.publish(small_state(1), 1)
    return store


def chunk_keys(redis_client: redis.Redis, namespace: str) -> list[bytes]:
    return sorted(redis_client.keys(f"{namespace}:weights:blob:*"), key=lambda key: int(key.rsplit(b":", 1)[1]))


def publish_other_bytes(redis_client: redis.Redis, namespace: str, fill: bytes) -> None:
    """Version 1's chunks overwritten with `fill` bytes and its record's digest made to match them: bytes that are
    not safetensors, published as if they were."""
    keys = chunk_keys(redis_client, namespace)
    for key in keys:
        redis_client.set(key, fill * len(redis_client.get(key)))
    data = b"".join(redis_client.get(key) for key in keys)
    redis_client.hset(f"{namespace}:weights:meta:1", "digest", f"sha256:{hashlib.sha256(data).hexdigest()}")


@pytest.mark.parametrize("damage,error", [
    (lambda c, ns: c.hdel(f"{ns}:weights:meta:1", "chunks"),
     r"weight version 1's record '{ns}:weights:meta:1' has no field chunks \(it has \['blob', 'bytes', 'digest', "
     r"'published_at'\]\)"),
    (lambda c, ns: c.hdel(f"{ns}:weights:meta:1", "digest"),
     r"weight version 1's record '{ns}:weights:meta:1' has no field digest \(it has \['blob', 'bytes', 'chunks', "
     r"'published_at'\]\)"),
    (lambda c, ns: c.hset(f"{ns}:weights:meta:1", "digest", "md5:0123"),
     r"weight version 1's record '{ns}:weights:meta:1': digest b'md5:0123' is not a sha256 digest"),
    (lambda c, ns: c.hdel(f"{ns}:weights:meta:1", "blob"),
     r"weight version 1's record '{ns}:weights:meta:1' has no field blob"),
    (lambda c, ns: c.hset(f"{ns}:weights:meta:1", "chunks", "three"),
     r"the field chunks of weight version 1's record '{ns}:weights:meta:1' is b'three', not a non-negative integer"),
    (lambda c, ns: c.hset(f"{ns}:weights:meta:1", "bytes", "-5"),
     r"the field bytes of weight version 1's record '{ns}:weights:meta:1' is b'-5', not a non-negative integer"),
    (lambda c, ns: c.hset(f"{ns}:weights:meta:1", "chunks", "0"),
     r"weight version 1's record '{ns}:weights:meta:1': chunks is 0, at least 1 expected"),
    (lambda c, ns: c.hset(f"{ns}:weights:meta:1", "chunks", "2000000"),
     r"weight version 1's record '{ns}:weights:meta:1': 2000000 chunks for \d+ bytes \(each chunk holds at least "
     r"one byte\)"),
    (lambda c, ns: c.hset(f"{ns}:weights:meta:1", "blob", b"\xff:x"),
     r"weight version 1's record '{ns}:weights:meta:1': blob b'\\xff:x' is not a blob id"),
    (lambda c, ns: c.delete(chunk_keys(c, ns)[2]),
     r"weight version 1: chunk '{ns}:weights:blob:\w+:2' \(3 of \d+\) is missing, though its record "
     r"'{ns}:weights:meta:1' lists it"),
    (lambda c, ns: publish_other_bytes(c, ns, b"x"),
     r"weight version 1 \(record '{ns}:weights:meta:1'\): its chunks do not make safetensors bytes: Error while "
     r"deserializing"),
    (lambda c, ns: c.set(chunk_keys(c, ns)[-1], b""),
     r"weight version 1 has \d+ bytes in its chunks '{ns}:weights:blob:\w+:0'.., its record '{ns}:weights:meta:1' "
     r"says \d+"),
    (lambda c, ns: (c.delete(f"{ns}:weights:meta:1"), c.set(f"{ns}:weights:meta:1", "x")),
     r"weight store key '{ns}:weights:meta:1' holds a Redis string, not a hash"),
], ids=["no-chunks-field", "no-digest-field", "digest-not-sha256", "no-blob-field", "chunks-not-a-number",
        "negative-bytes", "zero-chunks", "more-chunks-than-bytes", "bad-blob-id", "missing-chunk", "not-safetensors",
        "short-chunk", "record-not-a-hash"])
def test_a_corrupt_version_record_or_chunk_names_the_key(
    redis_client: redis.Redis, namespace: str, damage, error: str
) -> None:
    """Was a bare KeyError: b'chunks', `invalid literal for int()`, SafetensorError or 'the latest weight version kept
    being replaced' (a missing chunk) in the worker reading the weights, naming no key."""
    store = corrupt_store(redis_client, namespace)
    damage(redis_client, namespace)
    for fetch in (store.fetch, lambda: store.fetch(1)):
        with pytest.raises(WeightStoreError, match="^" + error.format(ns=namespace)) as info:
            fetch()
        # Not a version that went missing (fetch would retry it, a worker would take it for a pruning race).
        assert not isinstance(info.value, WeightVersionMissing)


def test_a_chunk_changed_after_publishing_is_refused_naming_both_digests(
    redis_client: redis.Redis, namespace: str
) -> None:
    """Same-length bytes over a chunk (a flipped bit, an operator's SETRANGE) still parse as safetensors: a worker
    loaded the wrong weights and said nothing."""
    store = corrupt_store(redis_client, namespace)
    meta_key = f"{namespace}:weights:meta:1"
    published = f"sha256:{hashlib.sha256(state_dict_to_bytes(small_state(1))).hexdigest()}"
    keys = chunk_keys(redis_client, namespace)
    last = redis_client.get(keys[-1])
    redis_client.setrange(keys[-1], len(last) - 1, bytes([last[-1] ^ 0x01]))  # a bit of the last tensor value
    changed = b"".join(redis_client.get(key) for key in keys)
    wrong = state_dict_from_bytes(changed)  # what a fetch returned: it parses, one value differs
    assert set(wrong) == set(small_state(1)) and not all(torch.equal(wrong[n], small_state(1)[n]) for n in wrong)
    computed = f"sha256:{hashlib.sha256(changed).hexdigest()}"
    error = (f"weight version 1: its chunks {keys[0].decode()!r}.. have digest {computed}, its record {meta_key!r} "
             f"says digest {published} (the chunks changed after publishing)")
    for fetch in (store.fetch, lambda: store.fetch(1)):
        with pytest.raises(WeightStoreError, match="^" + re.escape(error) + "$") as info:
            fetch()
        assert not isinstance(info.value, WeightVersionMissing)  # fetch does not retry it as a pruning race


def flip_a_bit_of_a_middle_chunk(redis_client: redis.Redis, keys: list[bytes]) -> None:
    middle = keys[len(keys) // 2]
    redis_client.setrange(middle, 0, bytes([redis_client.get(middle)[0] ^ 0x01]))


def swap_two_middle_chunks(redis_client: redis.Redis, keys: list[bytes]) -> None:
    first, second = redis_client.get(keys[1]), redis_client.get(keys[2])
    assert len(first) == len(second) and first != second
    redis_client.mset({keys[1]: second, keys[2]: first})


@pytest.mark.parametrize("damage", [flip_a_bit_of_a_middle_chunk, swap_two_middle_chunks],
                         ids=["bit-in-a-middle-chunk", "two-chunks-swapped"])
def test_a_middle_chunk_changed_or_out_of_order_is_refused_naming_both_digests(
    redis_client: redis.Redis, namespace: str, damage: Callable[[redis.Redis, list[bytes]], None]
) -> None:
    """Chunks are hashed one by one as they are read: every chunk counts, and in the record's order."""
    store = corrupt_store(redis_client, namespace)
    keys = chunk_keys(redis_client, namespace)
    assert len(keys) >= 4
    published = f"sha256:{hashlib.sha256(b''.join(redis_client.get(key) for key in keys)).hexdigest()}"
    damage(redis_client, keys)
    computed = f"sha256:{hashlib.sha256(b''.join(redis_client.get(key) for key in keys)).hexdigest()}"
    assert computed != published
    error = (f"weight version 1: its chunks {keys[0].decode()!r}.. have digest {computed}, its record "
             f"'{namespace}:weights:meta:1' says digest {published} (the chunks changed after publishing)")
    with pytest.raises(WeightStoreError, match="^" + re.escape(error) + "$"):
        store.fetch(1)


@pytest.mark.parametrize("state,chunk_bytes", [
    ({}, 64),
    (small_state(1), 64),
    (small_state(1), 1024 * 1024),
], ids=["empty", "multi-chunk", "one-chunk"])
def test_the_record_holds_the_sha256_of_the_published_bytes(
    redis_client: redis.Redis, namespace: str, state: dict[str, torch.Tensor], chunk_bytes: int
) -> None:
    store = RedisWeightStore(redis_client, namespace, chunk_bytes=chunk_bytes)
    store.publish(state, 1)
    data = state_dict_to_bytes(state)
    record = redis_client.hgetall(f"{namespace}:weights:meta:1")
    assert record[b"digest"] == f"sha256:{hashlib.sha256(data).hexdigest()}".encode()
    assert int(record[b"chunks"]) == -(-len(data) // chunk_bytes) and int(record[b"bytes"]) == len(data)
    for version, fetched in (store.fetch(), (1, store.fetch(1)[1])):
        assert version == 1
        assert_same(fetched, state)


def test_a_record_without_a_digest_is_still_pruned_and_cleared(redis_client: redis.Redis, namespace: str) -> None:
    """Deleting a version needs only its chunk keys: a record written before records held a digest does not stop
    the publish that prunes it, nor the clear() of a reused namespace."""
    store = RedisWeightStore(redis_client, namespace, keep_last=1)
    store.publish(small_state(1), 1)
    redis_client.hdel(f"{namespace}:weights:meta:1", "digest")
    store.publish(small_state(2), 2)  # keep_last=1: prunes version 1
    assert store.versions() == [2]
    assert len({key.split(b":")[3] for key in redis_client.keys(f"{namespace}:weights:blob:*")}) == 1
    redis_client.hdel(f"{namespace}:weights:meta:2", "digest")
    store.clear()
    assert redis_client.keys(f"{namespace}:weights:*") == []


def test_pruning_a_record_that_claims_millions_of_chunks_is_refused_by_name(
    redis_client: redis.Redis, namespace: str
) -> None:
    """Pruning listed every chunk key the record claimed in one command: a record rewritten to 2,000,000 chunks
    took the publisher 4 s and 640 MB, and 100,000,000 got it killed for memory."""
    store = RedisWeightStore(redis_client, namespace, keep_last=1)
    store.publish(small_state(1), 1)
    redis_client.hset(f"{namespace}:weights:meta:1", "chunks", "100000000")
    with pytest.raises(WeightStoreError, match=rf"^weight version 1's record '{namespace}:weights:meta:1': "
                                               r"100000000 chunks for \d+ bytes"):
        store.publish(small_state(2), 2)  # keep_last=1: publishing version 2 prunes version 1


@pytest.mark.parametrize("value,error", [
    (b"abc", r"the latest version pointer '{ns}:weights:latest' is b'abc', not a non-negative integer"),
    (b"-1", r"the latest version pointer '{ns}:weights:latest' is b'-1', not a non-negative integer"),
    (b"7", r"the latest version pointer '{ns}:weights:latest' says 7, but its record '{ns}:weights:meta:7' is "
           r"missing \(available: \[1\]\)"),
], ids=["not-a-number", "negative", "no-such-version"])
def test_a_latest_pointer_that_is_not_a_published_version_names_the_key(
    redis_client: redis.Redis, namespace: str, value: bytes, error: str
) -> None:
    store = corrupt_store(redis_client, namespace)
    redis_client.set(f"{namespace}:weights:latest", value)
    with pytest.raises(WeightStoreError, match="^" + error.format(ns=namespace)):
        store.fetch()
    if value != b"7":
        with pytest.raises(WeightStoreError, match="^" + error.format(ns=namespace)):
            store.latest_version()  # what the learner reads at setup and the workers before every fetch


def test_a_version_index_member_or_key_of_another_type_names_the_key(redis_client: redis.Redis, namespace: str) -> None:
    store = corrupt_store(redis_client, namespace)
    redis_client.zadd(f"{namespace}:weights:versions", {"v2": 2})
    with pytest.raises(WeightStoreError, match=rf"^a member of the version index '{namespace}:weights:versions' is "
                                               rf"b'v2', not a non-negative integer"):
        store.versions()
    redis_client.delete(f"{namespace}:weights:latest")
    redis_client.rpush(f"{namespace}:weights:latest", "1")
    with pytest.raises(WeightStoreError, match=rf"^weight store key '{namespace}:weights:latest' holds a Redis list, "
                                               rf"not a string"):
        store.latest_version()


class PruningClient(redis.Redis):
    """A real client to the test Redis whose first read of a chunk lets `prune` run first: a version pruned by
    the learner between a worker reading its record and its chunks."""

    prune: Any = None

    def get(self, name: Any) -> Any:
        if b":weights:blob:" in (name if isinstance(name, bytes) else str(name).encode()) and self.prune is not None:
            prune, self.prune = self.prune, None
            prune()
        return super().get(name)


def test_a_version_pruned_while_read_is_still_told_apart_from_a_lost_chunk(redis_url: str, namespace: str) -> None:
    client = PruningClient.from_url(redis_url)
    reader = RedisWeightStore(client, namespace)
    writer = RedisWeightStore(redis.Redis.from_url(redis_url), namespace, keep_last=1)
    writer.publish(small_state(1), 1)
    client.prune = lambda: writer.publish(small_state(2), 2)  # keep_last=1: version 1 goes
    with pytest.raises(WeightVersionMissing, match="weight version 1 was pruned while it was read"):
        reader.fetch(1)
    client.prune = lambda: writer.publish(small_state(3), 3)
    version, state = reader.fetch()  # the latest: read again once replaced
    assert version == 3
    assert_same(state, small_state(3))


class FailingSetClient(redis.Redis):
    """A real client to the test Redis whose write of chunk `fail_at` fails: the connection dropped mid-publish."""

    fail_at = 2

    def set(self, name: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        if str(name).endswith(f":{self.fail_at}"):
            raise redis.ConnectionError("connection dropped")
        return super().set(name, value, *args, **kwargs)


def test_a_publish_whose_chunk_write_fails_raises_and_stops_hashing(redis_url: str, namespace: str) -> None:
    store = RedisWeightStore(FailingSetClient.from_url(redis_url), namespace, chunk_bytes=64)
    with pytest.raises(redis.ConnectionError, match="connection dropped"):
        store.publish(small_state(1), 1)
    assert store.latest_version() is None
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("weight-digest")]
