"""Versioned policy weights: the learner publishes, rollout workers fetch the newest.

`WeightStore` is the interface; `RedisWeightStore` keeps safetensors bytes in Redis, split into
chunks below Redis' 512 MB value limit. A version becomes visible only after all of its chunks are
written: the chunks go under a fresh blob id with an expiry, and one Lua script then checks that
the version is newer than the latest, makes the chunks permanent, records the version and bumps
the latest pointer. A crashed publish leaves nothing visible and its chunks expire. Only the last
`keep_last` versions are kept.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping

import redis
import torch
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

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
_REDIS_MAX_VALUE_BYTES = 512 * 1024 * 1024


class WeightStoreError(RuntimeError):
    """Weights could not be published or fetched."""


class WeightVersionError(WeightStoreError, ValueError):
    """A publish with a version that is not newer than the latest one."""


class WeightVersionMissing(WeightStoreError, LookupError):
    """The requested version does not exist (never published, or already pruned)."""


def state_dict_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a state dict (CPU copies; tied/shared tensors are stored separately)."""
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise WeightStoreError(f"state_dict keys must be strings, got {type(name).__name__} {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise WeightStoreError(f"state_dict[{name!r}] must be a torch tensor, got {type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        whole = storage.nbytes() == tensor.numel() * tensor.element_size()
        # safetensors refuses tensors that share memory (tied embeddings) or views into a larger
        # buffer; give those their own copy.
        if storage.data_ptr() in seen_storages or not whole:
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        if tensor.numel():
            seen_storages.add(storage.data_ptr())
        tensors[name] = tensor
    return safetensors_save(tensors)


def state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return safetensors_load(data)


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

    def fetch_if_newer(self, current: int | None) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The latest weights if they are newer than `current`, else None (cheap when up to date)."""
        latest = self.latest_version()
        if latest is None or (current is not None and latest <= current):
            return None
        return self.fetch(latest)

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
# ARGV: version, blob id, chunk count, total bytes, publish time.
_COMMIT_LUA = """
local version = tonumber(ARGV[1])
local latest = redis.call('GET', KEYS[1])
if latest and tonumber(latest) >= version then
  return redis.error_reply('STALE version ' .. ARGV[1] .. ' is not newer than the latest version ' .. latest)
end
for i = 4, #KEYS do
  if redis.call('PERSIST', KEYS[i]) == 0 and redis.call('EXISTS', KEYS[i]) == 0 then
    return redis.error_reply('MISSING chunk ' .. KEYS[i] .. ' expired before the commit')
  end
end
redis.call('HSET', KEYS[3], 'blob', ARGV[2], 'chunks', ARGV[3], 'bytes', ARGV[4], 'published_at', ARGV[5])
redis.call('ZADD', KEYS[2], version, ARGV[1])
redis.call('SET', KEYS[1], ARGV[1])
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
    ) -> None:
        check_namespace(namespace)
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if not 0 < chunk_bytes <= _REDIS_MAX_VALUE_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{_REDIS_MAX_VALUE_BYTES} (Redis' value limit), got {chunk_bytes}")
        if upload_ttl_s < 1:
            raise ValueError(f"upload_ttl_s must be >= 1, got {upload_ttl_s}")
        self.client = client
        self.namespace = namespace
        self.keep_last = keep_last
        self.chunk_bytes = chunk_bytes
        self.upload_ttl_s = upload_ttl_s
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
        # One chunk per command: a pipeline of all chunks would buffer the whole model twice.
        for index, start in enumerate(range(0, max(len(data), 1), self.chunk_bytes)):
            key = self._chunk_key(blob, index)
            self.client.set(key, data[start : start + self.chunk_bytes], ex=self.upload_ttl_s)
            chunk_keys.append(key)
        try:
            self._commit(
                keys=[self._latest_key, self._versions_key, self._meta_key(version), *chunk_keys],
                args=[version, blob, len(chunk_keys), len(data), f"{time.time():.6f}"],
            )
        except redis.ResponseError as exc:
            self.client.delete(*chunk_keys)
            if "STALE" in str(exc):
                raise WeightVersionError(str(exc).replace("STALE ", "")) from exc
            raise WeightStoreError(f"publishing weight version {version} failed: {exc}") from exc
        self._prune()

    def latest_version(self) -> int | None:
        value = self.client.get(self._latest_key)
        return None if value is None else int(value)

    def versions(self) -> list[int]:
        return [int(v) for v in self.client.zrange(self._versions_key, 0, -1)]

    def fetch(self, version: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        if version is not None:
            return version, state_dict_from_bytes(self._read(version))
        # The latest version can be pruned between reading its number and its chunks when the
        # learner publishes fast; try the new latest a few times.
        for _ in range(5):
            latest = self.latest_version()
            if latest is None:
                raise WeightVersionMissing(f"no weights published under namespace {self.namespace!r} yet")
            try:
                return latest, state_dict_from_bytes(self._read(latest))
            except WeightVersionMissing:
                continue
        raise WeightStoreError("the latest weight version kept being replaced while it was read")

    def _read(self, version: int) -> bytes:
        meta = self.client.hgetall(self._meta_key(version))
        if not meta:
            available = self.versions()
            raise WeightVersionMissing(f"weight version {version} is not available (available: {available})")
        blob = meta[b"blob"].decode()
        chunks = int(meta[b"chunks"])
        total = int(meta[b"bytes"])
        parts = []
        for index in range(chunks):
            part = self.client.get(self._chunk_key(blob, index))
            if part is None:
                raise WeightVersionMissing(f"weight version {version} was pruned while it was read")
            parts.append(part)
        data = b"".join(parts)
        if len(data) != total:
            raise WeightStoreError(f"weight version {version} has {len(data)} bytes, its record says {total}")
        return data

    # -- housekeeping ---------------------------------------------------------------------------------

    def _prune(self) -> None:
        old = self.client.zrange(self._versions_key, 0, -(self.keep_last + 1))
        for raw in old:
            self._delete_version(int(raw))

    def _delete_version(self, version: int) -> None:
        meta = self.client.hgetall(self._meta_key(version))
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self._versions_key, str(version))
        pipe.delete(self._meta_key(version))
        if meta:
            blob = meta[b"blob"].decode()
            chunk_keys = [self._chunk_key(blob, i) for i in range(int(meta[b"chunks"]))]
            if chunk_keys:
                pipe.delete(*chunk_keys)
        pipe.execute()

    def clear(self) -> None:
        """Delete every version and the latest pointer (a fresh run in a reused namespace)."""
        for version in self.versions():
            self._delete_version(version)
        self.client.delete(self._latest_key, self._versions_key)
