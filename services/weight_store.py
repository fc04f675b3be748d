"""Versioned policy weights: the learner publishes, rollout workers fetch the newest.

`WeightStore` is the interface; `RedisWeightStore` keeps safetensors bytes in Redis, split into
chunks below Redis' 512 MB value limit. A version becomes visible only after all of its chunks are
written: the chunks go under a fresh blob id with an expiry, and one Lua script then checks that
the version is newer than the latest, makes the chunks permanent, records the version and bumps
the latest pointer. A crashed publish leaves nothing visible and its chunks expire. Only the last
`keep_last` versions are kept. The record holds a sha256 digest of the bytes, and a fetch checks it: a chunk
changed after publishing (same length, so safetensors would still parse it) is refused, not loaded as weights.
With `key_ttl_s` (a service run's: its driver refreshes the expiry of every key of its namespace) the commit
gives the version's keys that expiry instead of making them permanent, so that a run whose driver was killed
leaves no weights in Redis for good.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

import redis
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from refine.config import check_namespace

__all__ = [
    "RedisWeightStore",
    "WeightStore",
    "WeightStoreError",
    "WeightVersionError",
    "WeightVersionMissing",
    "state_dict_to_bytes",
    "state_dict_from_bytes",
]

T = TypeVar("T")

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
_REDIS_MAX_VALUE_BYTES = 512 * 1024 * 1024
_DIGEST_PATTERN = re.compile(rb"sha256:[0-9a-f]{64}")


class WeightStoreError(RuntimeError):
    """Weights could not be published or fetched."""


class WeightVersionError(WeightStoreError, ValueError):
    """A publish with a version that is not newer than the latest one."""


class WeightVersionMissing(WeightStoreError, LookupError):
    """The requested version does not exist (never published, or already pruned)."""


# safetensors' names for the dtypes a model's state holds; a state with any other goes through safetensors' writer.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def state_dict_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytearray | bytes:
    """safetensors bytes of a state dict (tied/shared tensors are stored separately), read by safetensors' own loader.

    Written here, each tensor copied once into the result: safetensors.torch.save copies every tensor to bytes and
    then all of them into its result, which made this most of a publish (500 MB: 0.58 s, against the ~0.45 s Redis
    takes to receive them). The layout is safetensors' (a little-endian u64 header size, the JSON header padded with
    spaces to 8 bytes, the tensors' bytes back to back)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise WeightStoreError(f"state_dict keys must be strings, got {type(name).__name__} {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise WeightStoreError(f"state_dict[{name!r}] must be a torch tensor, got {type(tensor).__name__}")
        tensors[name] = tensor.detach()
    if any(tensor.dtype not in _SAFETENSORS_DTYPES for tensor in tensors.values()):
        return _library_bytes(tensors)
    header, offset = {}, 0
    # Wider elements first, as safetensors orders them: every tensor's bytes start aligned to its element size.
    for name, tensor in sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0])):
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    data = bytearray(8 + len(encoded) + offset)
    data[:8] = struct.pack("<Q", len(encoded))
    data[8 : 8 + len(encoded)] = encoded
    start = 8 + len(encoded)
    for name, tensor in tensors.items():
        begin, end = header[name]["data_offsets"]
        if end > begin:  # a tensor's bytes: its elements in order, whatever its strides or device
            target = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=start + begin)
            target.copy_(tensor.reshape(-1).view(torch.uint8))
    return data


def _library_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors.torch.save's bytes, each tensor given its own memory (it refuses shared ones)."""
    own: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen_storages or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        if tensor.numel():
            seen_storages.add(storage.data_ptr())
        own[name] = tensor
    return safetensors_save(own)


def state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return safetensors_load(data)


class _ChunkDigest:
    """The digest a version record holds for its bytes, the algorithm named ("sha256:<64 hex digits>"), fed chunk by
    chunk and hashed on a background thread in the order given.

    Hashing 500 MB takes about half a second, a large share of its publish or fetch; hashlib releases the GIL while
    it hashes a large buffer, so a chunk is hashed on another core while Redis sends or receives the next one. The
    chunks are hashed where they are, not copied. Use it as a context manager: leaving drops the chunks not yet hashed
    (a failed transfer needs no digest) and waits for the one being hashed.
    """

    def __init__(self) -> None:
        # sha256 over blake2b: OpenSSL's sha256 uses the CPU's SHA extensions, about 1.1 GB/s against 0.85 GB/s.
        self._hash = hashlib.sha256()
        # One worker: its queue runs the updates in the order they were added.
        self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-digest")

    def add(self, chunk: bytes | memoryview) -> None:
        """Hash `chunk` after the chunks added before it; it must not change until `hexdigest` returns."""
        self._hashing.submit(self._hash.update, chunk)

    def hexdigest(self) -> str:
        """The digest of every chunk added, once they are hashed."""
        self._hashing.shutdown(wait=True)
        return f"sha256:{self._hash.hexdigest()}"

    def __enter__(self) -> _ChunkDigest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._hashing.shutdown(wait=True, cancel_futures=True)


def _number(value: bytes, what: str) -> int:
    """A non-negative integer Redis holds (a version, a chunk count, a size); a WeightStoreError naming `what`
    (the key, and the field) when it is not one: something other than publish wrote there."""
    if not (value.isascii() and value.isdigit()):
        raise WeightStoreError(f"{what} is {value!r}, not a non-negative integer")
    return int(value)


class WeightStore(ABC):
    """Versioned weights shared between the learner and rollout workers."""

    @abstractmethod
    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Make `state_dict` available as `version`, which must be newer than the latest."""

    @abstractmethod
    def latest_version(self) -> int | None:
        """The newest published version, or None before the first publish."""

    @abstractmethod
    def fetch(self, version: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """Weights of `version` (the latest when None) as CPU tensors."""

    @abstractmethod
    def versions(self) -> list[int]:
        """Versions still available, oldest first."""

    def wait_for_version(self, min_version: int, timeout_s: float, poll_s: float = 0.05) -> int:
        """Block until a version >= `min_version` is published; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            latest = self.latest_version()
            if latest is not None and latest >= min_version:
                return latest
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"weight version >= {min_version} not published within {timeout_s}s (latest: {latest})"
                )
            time.sleep(poll_s)


# KEYS: latest, versions zset, meta hash of this version, then the chunk keys.
# ARGV: version, blob id, chunk count, total bytes, digest of the bytes, publish time, the keys' expiry in ms
# (0: none). Idempotent: redis-py re-sends a command whose reply a dropped connection lost, and a commit that ran
# already is found by its blob id (fresh per publish) rather than refused as stale and its chunks deleted.
_COMMIT_LUA = """
local version = tonumber(ARGV[1])
local ttl = tonumber(ARGV[7])
local latest = redis.call('GET', KEYS[1])
if latest and tonumber(latest) >= version then
  if redis.call('HGET', KEYS[3], 'blob') == ARGV[2] then
    return 1  -- this very commit, sent again by the client's retry after its reply was lost: done already
  end
  return redis.error_reply('STALE version ' .. ARGV[1] .. ' is not newer than the latest version ' .. latest)
end
for i = 4, #KEYS do
  local missing
  if ttl > 0 then
    missing = redis.call('PEXPIRE', KEYS[i], ttl) == 0
  else
    missing = redis.call('PERSIST', KEYS[i]) == 0 and redis.call('EXISTS', KEYS[i]) == 0
  end
  if missing then
    return redis.error_reply('MISSING chunk ' .. KEYS[i] .. ' expired before the commit')
  end
end
redis.call('HSET', KEYS[3], 'blob', ARGV[2], 'chunks', ARGV[3], 'bytes', ARGV[4], 'digest', ARGV[5],
           'published_at', ARGV[6])
redis.call('ZADD', KEYS[2], version, ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
if ttl > 0 then
  for i = 1, 3 do
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
"""


class RedisWeightStore(WeightStore):
    """Weights as chunked safetensors bytes under `<namespace>:weights:`."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        keep_last: int = 2,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        upload_ttl_s: int = 3600,
        key_ttl_s: float | None = None,
    ) -> None:
        check_namespace(namespace)
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if not 0 < chunk_bytes <= _REDIS_MAX_VALUE_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{_REDIS_MAX_VALUE_BYTES} (Redis' value limit), got {chunk_bytes}")
        if upload_ttl_s < 1:
            raise ValueError(f"upload_ttl_s must be >= 1, got {upload_ttl_s}")
        if key_ttl_s is not None and not key_ttl_s > 0:
            raise ValueError(f"key_ttl_s must be positive or None, got {key_ttl_s}")
        self.client = client
        self.namespace = namespace
        self.keep_last = keep_last
        self.chunk_bytes = chunk_bytes
        self.upload_ttl_s = upload_ttl_s
        self.key_ttl_ms = 0 if key_ttl_s is None else max(1, int(key_ttl_s * 1000))  # 0: committed keys are permanent
        self._commit = client.register_script(_COMMIT_LUA)

    # -- keys -------------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, "weights", *parts))

    @property
    def _latest_key(self) -> str:
        return self._key("latest")

    @property
    def _versions_key(self) -> str:
        return self._key("versions")

    def _meta_key(self, version: int) -> str:
        return self._key("meta", str(version))

    def _chunk_key(self, blob: str, index: int) -> str:
        return self._key("blob", blob, str(index))

    # -- interface --------------------------------------------------------------------------------

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise WeightVersionError(f"version must be a non-negative integer, got {version!r}")
        latest = self.latest_version()
        if latest is not None and version <= latest:
            raise WeightVersionError(f"version {version} is not newer than the latest version {latest}")
        data = memoryview(state_dict_to_bytes(state_dict))
        blob = uuid.uuid4().hex
        chunk_keys = []
        with _ChunkDigest() as chunk_digest:
            # One chunk per command: a pipeline of all chunks would buffer the whole model twice.
            for index, start in enumerate(range(0, max(len(data), 1), self.chunk_bytes)):
                key = self._chunk_key(blob, index)
                chunk = data[start : start + self.chunk_bytes]
                chunk_digest.add(chunk)  # hashed while it is sent
                self.client.set(key, chunk, ex=self.upload_ttl_s)
                chunk_keys.append(key)
            digest = chunk_digest.hexdigest()
        try:
            self._commit(
                keys=[self._latest_key, self._versions_key, self._meta_key(version), *chunk_keys],
                args=[version, blob, len(chunk_keys), len(data), digest, f"{time.time():.6f}", self.key_ttl_ms],
            )
        except redis.ResponseError as exc:
            self.client.delete(*chunk_keys)
            if "STALE" in str(exc):
                raise WeightVersionError(str(exc).replace("STALE ", "")) from exc
            raise WeightStoreError(f"publishing weight version {version} failed: {exc}") from exc
        self._prune()

    def latest_version(self) -> int | None:
        value = self._redis(self.client.get, self._latest_key, "string")
        return None if value is None else _number(value, f"the latest version pointer {self._latest_key!r}")

    def versions(self) -> list[int]:
        members = self._redis(lambda key: self.client.zrange(key, 0, -1), self._versions_key, "sorted set")
        return [_number(member, f"a member of the version index {self._versions_key!r}") for member in members]

    def fetch(self, version: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        if version is not None:
            return version, self._load(version)
        # The latest version can be pruned between reading its number and its chunks when the
        # learner publishes fast; try the new latest a few times.
        seen = []
        for _ in range(5):
            latest = self.latest_version()
            if latest is None:
                raise WeightVersionMissing(f"no weights published under namespace {self.namespace!r} yet")
            seen.append(latest)
            try:
                return latest, self._load(latest)
            except WeightVersionMissing:
                continue
        if len(set(seen)) == 1:  # never replaced: the pointer names a version that has no record
            raise WeightStoreError(f"the latest version pointer {self._latest_key!r} says {seen[0]}, but its record "
                                   f"{self._meta_key(seen[0])!r} is missing (available: {self.versions()})")
        raise WeightStoreError("the latest weight version kept being replaced while it was read")

    def _load(self, version: int) -> dict[str, torch.Tensor]:
        data = self._read(version)
        try:
            return state_dict_from_bytes(data)
        except SafetensorError as exc:
            raise WeightStoreError(f"weight version {version} (record {self._meta_key(version)!r}): its chunks do not "
                                   f"make safetensors bytes: {exc}") from None

    def _read(self, version: int) -> bytes:
        meta_key = self._meta_key(version)
        record = self._record(version)
        if record is None:
            available = self.versions()
            raise WeightVersionMissing(f"weight version {version} is not available (available: {available})")
        blob, chunks, total, digest = record
        parts = []
        with _ChunkDigest() as chunk_digest:
            for index in range(chunks):
                chunk_key = self._chunk_key(blob, index)
                part = self._redis(self.client.get, chunk_key, "string")
                if part is None:
                    # Pruning deletes a version's record and chunks together: a record still there lost a chunk.
                    if self._record(version) != record:
                        raise WeightVersionMissing(f"weight version {version} was pruned while it was read")
                    raise WeightStoreError(f"weight version {version}: chunk {chunk_key!r} ({index + 1} of {chunks}) "
                                           f"is missing, though its record {meta_key!r} lists it")
                chunk_digest.add(part)  # hashed while the next chunk is read
                parts.append(part)
            data = b"".join(parts)
            computed = chunk_digest.hexdigest()
        if len(data) != total:
            raise WeightStoreError(f"weight version {version} has {len(data)} bytes in its chunks "
                                   f"{self._chunk_key(blob, 0)!r}.., its record {meta_key!r} says {total}")
        if computed != digest:
            raise WeightStoreError(f"weight version {version}: its chunks {self._chunk_key(blob, 0)!r}.. have digest "
                                   f"{computed}, its record {meta_key!r} says digest {digest} (the chunks changed "
                                   f"after publishing)")
        return data

    def _record(self, version: int, need_digest: bool = True) -> tuple[str, int, int, str] | None:
        """(blob id, chunk count, total bytes, digest) of `version`'s record, None when there is none; a
        WeightStoreError naming the key when a field is missing or malformed. Deleting a version needs no digest
        (`need_digest=False`, digest ""): a record written before records held one can still be pruned."""
        key = self._meta_key(version)
        meta = self._redis(self.client.hgetall, key, "hash")
        if not meta:
            return None
        required = ("blob", "chunks", "bytes", "digest") if need_digest else ("blob", "chunks", "bytes")
        missing = [field for field in required if field.encode() not in meta]
        if missing:
            raise WeightStoreError(f"weight version {version}'s record {key!r} has no field {', '.join(missing)} "
                                   f"(it has {sorted(field.decode(errors='replace') for field in meta)})")
        blob = meta[b"blob"]
        # publish writes a uuid4 hex id: anything else would name other keys (or none).
        if not (blob.isascii() and blob.isalnum()):
            raise WeightStoreError(f"weight version {version}'s record {key!r}: blob {blob!r} is not a blob id "
                                   f"(letters and digits)")
        chunks = _number(meta[b"chunks"], f"the field chunks of weight version {version}'s record {key!r}")
        if chunks < 1:  # publish writes at least one chunk, an empty one for no bytes
            raise WeightStoreError(f"weight version {version}'s record {key!r}: chunks is 0, at least 1 expected")
        total = _number(meta[b"bytes"], f"the field bytes of weight version {version}'s record {key!r}")
        # Every chunk holds a byte or more (one empty chunk for no bytes). A larger count, which something other
        # than publish wrote, would have pruning list millions of chunk keys in one command.
        if chunks > max(total, 1):
            raise WeightStoreError(f"weight version {version}'s record {key!r}: {chunks} chunks for {total} bytes "
                                   f"(each chunk holds at least one byte)")
        if not need_digest:
            return blob.decode(), chunks, total, ""
        digest = meta[b"digest"]
        if not _DIGEST_PATTERN.fullmatch(digest):
            raise WeightStoreError(f"weight version {version}'s record {key!r}: digest {digest!r} is not a sha256 "
                                   f"digest ('sha256:' and 64 lowercase hex digits)")
        return blob.decode(), chunks, total, digest.decode()

    def _redis(self, command: Callable[[str], T], key: str, kind: str) -> T:
        """`command(key)`, with Redis' WRONGTYPE refusal named by the key (something else wrote there)."""
        try:
            return command(key)
        except redis.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            actual = self.client.type(key)
            actual = actual.decode() if isinstance(actual, bytes) else actual
            raise WeightStoreError(f"weight store key {key!r} holds a Redis {actual}, not a {kind}") from None

    # -- housekeeping ---------------------------------------------------------------------------------

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep_last]:
            self._delete_version(version)

    def _delete_version(self, version: int) -> None:
        record = self._record(version, need_digest=False)
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self._versions_key, str(version))
        pipe.delete(self._meta_key(version))
        if record is not None:
            blob, chunks, _, _ = record
            pipe.delete(*[self._chunk_key(blob, i) for i in range(chunks)])
        pipe.execute()

    def clear(self) -> None:
        """Delete every version and the latest pointer (a fresh run in a reused namespace)."""
        for version in self.versions():
            self._delete_version(version)
        self.client.delete(self._latest_key, self._versions_key)
