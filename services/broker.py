"""Message transport between roles on Redis Streams, plus run control.

Delivery is at-least-once: a consumer group hands each entry to one consumer, the entry stays
pending until acknowledged, and entries a dead consumer held are reclaimed by another after an idle
time. Acknowledge only after the message has been durably used. Exactly-once training on top of
that is the consumed-set guard: a consumer skips a message id `already_consumed` reports, and records
one it used with `ack_consumed`, which adds the id and acknowledges the entry in one transaction.

Entries that cannot be decoded are moved to `<stream>:dead` (with the error) and acknowledged, so
one bad message never blocks a group.

Every key lives under `<namespace>:`, so runs sharing one Redis never see each other's data. With `key_ttl_s` (a
service run's roles and driver) every key the broker writes gets that expiry, and the driver refreshes it for the
whole namespace while the run goes on (`expire_namespace`): a run whose driver was killed leaves nothing for good.

Streams are made by whoever sets a run up (`ensure_group`: the driver, before any role starts). A consumer group
lost meanwhile is made again on its stream as it is: a stream that no longer exists is never brought back (a role
still reading while its run's namespace is deleted would leave keys behind), it raises `StreamGone`. A broker made
with `make_streams=False` (a role's) makes no stream at all, by its reads or its publishes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import redis
from pydantic import BaseModel

from refine.config import check_namespace
from services.codec import DEFAULT_LIMITS, CodecError, CodecLimits, decode, encode
from services.resilience import RedisStateLost

__all__ = ["Broker", "DeadLetter", "StreamGone"]

M = TypeVar("M", bound=BaseModel)

_PAYLOAD = b"m"
_TYPE = b"t"

# One round trip, and the server's clock: heartbeats from machines with skewed clocks compare fairly. ARGV: the
# member, the namespace's key expiry in ms (0: none).
_HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return tostring(now)
"""

# Reset the idle time of entries `consumer` still holds, leaving their delivery count alone (XCLAIM
# JUSTID does not count a delivery). The ownership check and the claim are one atomic step, so an
# entry another consumer has taken over meanwhile is never pulled back.
_KEEP_ALIVE_LUA = """
local refreshed = 0
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    refreshed = refreshed + 1
  end
end
return refreshed
"""


# The run's claim on its namespace (see Broker.claim): renewed while ours, taken again if it lapsed and nobody
# took it; the holder's value otherwise. One atomic step, so two drivers never both hold it.
_RENEW_CLAIM_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return ''
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ''
end
return holder
"""

# Remove the claim only while ours: a claim another run took after ours lapsed stays.
_RELEASE_CLAIM_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if not holder then
  return 1
end
return 0
"""


class StreamGone(RedisStateLost):
    """A stream the run made no longer exists: its namespace was deleted (the run ended), or Redis lost it
    (restarted without persistence, flushed). Raised instead of making the stream again."""


class DeadLetter(BaseModel):
    """An entry that could not be used, as kept in `<stream>:dead`."""

    stream: str
    entry_id: str
    error: str
    payload: bytes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Broker:
    """Redis Streams broker for one run's namespace."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        limits: CodecLimits = DEFAULT_LIMITS,
        key_ttl_s: float | None = None,
        make_streams: bool = True,
    ) -> None:
        """`make_streams=False`: reads and publishes raise StreamGone for a stream that does not exist (a role of a
        service run, whose driver made every stream before starting it), rather than make it."""
        check_namespace(namespace)
        if key_ttl_s is not None and not key_ttl_s > 0:
            raise ValueError(f"key_ttl_s must be positive or None, got {key_ttl_s}")
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("Broker needs a Redis client with decode_responses=False (payloads are bytes)")
        self.client = client
        self.namespace = namespace
        self.limits = limits
        # The expiry, in ms, of every key written here; None: keys created have none, and keys rewritten keep theirs.
        self.key_ttl_ms = None if key_ttl_s is None else max(1, int(key_ttl_s * 1000))
        self.make_streams = make_streams
        self._heartbeat_script = client.register_script(_HEARTBEAT_LUA)
        self._keep_alive_script = client.register_script(_KEEP_ALIVE_LUA)
        self._renew_claim_script = client.register_script(_RENEW_CLAIM_LUA)
        self._release_claim_script = client.register_script(_RELEASE_CLAIM_LUA)
        self._known_groups: set[tuple[str, str]] = set()

    # -- keys -------------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """Full Redis key for a name inside this namespace."""
        for part in parts:
            if not isinstance(part, str) or not part:
                raise ValueError(f"key part must be a non-empty string, got {part!r}")
        return ":".join((self.namespace, *parts))

    def _stream(self, stream: str) -> str:
        return self.key("stream", stream)

    def expire_with(self, pipe: Any, *keys: str) -> None:
        """Queue on `pipe` the namespace's key expiry for `keys` (nothing without one)."""
        if self.key_ttl_ms is not None:
            for key in keys:
                pipe.pexpire(key, self.key_ttl_ms)

    def set_value(self, key: str, value: bytes | str) -> None:
        """SET `key` with the namespace's key expiry; without one, keeping the expiry the key has (a plain SET drops
        it, and the driver's refresh may have given it one)."""
        if self.key_ttl_ms is None:
            self.client.set(key, value, keepttl=True)
        else:
            self.client.set(key, value, px=self.key_ttl_ms)

    def dead_letter_stream(self, stream: str) -> str:
        """Stream name (inside the namespace) that collects `stream`'s unusable entries."""
        return f"{stream}:dead"

    # -- streams ----------------------------------------------------------------------------------

    def publish(
        self, stream: str, message: BaseModel, maxlen: int | None = None, approximate: bool = True
    ) -> str:
        """Append a message; returns its stream entry id. `maxlen` trims the oldest entries.

        Trimming drops entries whether or not a group has read them: size it well above the
        largest backlog a run can hold.
        """
        if maxlen is not None and maxlen <= 0:
            raise ValueError(f"maxlen must be positive or None, got {maxlen}")
        payload = encode(message, self.limits)
        entry_id = self.client.xadd(
            self._stream(stream),
            {_PAYLOAD: payload, _TYPE: type(message).__name__},
            maxlen=maxlen,
            approximate=approximate,
            nomkstream=not self.make_streams,
        )
        if entry_id is None:  # NOMKSTREAM: the stream does not exist
            raise self._gone(stream)
        return _text(entry_id)

    def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """Create the consumer group (and the stream) unless it exists. `start_id="0"`: the group
        sees everything already in the stream; `"$"`: only what is published from now on."""
        self._make_group(stream, group, start_id, make_stream=True)

    def _make_group(self, stream: str, group: str, start_id: str, make_stream: bool) -> None:
        """The consumer group, made unless this broker knows it; without `make_stream`, only on a stream that exists
        (StreamGone otherwise)."""
        if (stream, group) in self._known_groups:
            return
        key = self._stream(stream)
        try:
            self.client.xgroup_create(key, group, id=start_id, mkstream=make_stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                if not make_stream and not self.client.exists(key):
                    raise self._gone(stream, group) from exc
                raise
        else:
            if self.key_ttl_ms is not None:  # XADD leaves a stream's expiry as it is: it comes from here, or the driver
                self.client.pexpire(key, self.key_ttl_ms)
        self._known_groups.add((stream, group))

    def _gone(self, stream: str, group: str | None = None) -> StreamGone:
        reader = "" if group is None else f" (read by consumer group {group!r})"
        return StreamGone(f"stream {self._stream(stream)!r}{reader} no longer exists")

    def _with_group(self, stream: str, group: str, command: Any) -> Any:
        # The group may vanish under us (stream deleted, Redis restarted without persistence): made again on the
        # stream, it is read from its start. A read blocked on a stream that is deleted meanwhile gets UNBLOCKED
        # (newer Redis versions; older ones answer the next read NOGROUP): the same case. A stream gone is not made
        # again (StreamGone): its run ended (a role killed late would leave it behind) or Redis lost the run's
        # state, which services.orchestrator names.
        self._make_group(stream, group, "0", make_stream=self.make_streams)
        try:
            return command()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            self._known_groups.discard((stream, group))
            self._make_group(stream, group, "0", make_stream=False)
            return command()

    def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        message_type: type[M],
        count: int = 1,
        block_ms: int | None = None,
    ) -> list[tuple[str, M]]:
        """Up to `count` new entries for `consumer`, decoded as `message_type`.

        `block_ms=None` returns at once; otherwise waits up to that long for an entry (it must stay
        below the client's socket timeout). Entries stay pending until `ack`.
        """
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        if block_ms is not None:
            if block_ms <= 0:
                raise ValueError(f"block_ms must be positive or None (0 would block forever), got {block_ms}")
            socket_timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
            if socket_timeout is not None and block_ms >= socket_timeout * 1000:
                raise ValueError(
                    f"block_ms={block_ms} must be below the client's socket timeout ({socket_timeout}s)"
                )
        response = self._with_group(
            stream, group,
            lambda: self.client.xreadgroup(group, consumer, {self._stream(stream): ">"}, count=count, block=block_ms),
        )
        entries: list[tuple[bytes, dict[bytes, bytes] | None]] = []
        for _name, stream_entries in response or []:
            entries.extend(stream_entries)
        return self._decode_entries(stream, group, entries, message_type)

    def _decode_entries(
        self,
        stream: str,
        group: str,
        entries: Iterable[tuple[bytes, dict[bytes, bytes] | None]],
        message_type: type[M],
    ) -> list[tuple[str, M]]:
        out: list[tuple[str, M]] = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            if fields is None:
                # Trimmed away while pending (Redis 6.2 reports it as an empty entry): nothing to use.
                self.ack(stream, group, [entry_id])
                continue
            payload = fields.get(_PAYLOAD)
            try:
                if payload is None:
                    raise CodecError(f"stream entry {entry_id} has no payload field")
                message = decode(payload, message_type, self.limits)
            except CodecError as exc:
                self.dead_letter(stream, group, entry_id, payload or b"", str(exc))
                continue
            except Exception as exc:  # a decoder bug: still only this entry is lost, not the whole read
                self.dead_letter(stream, group, entry_id, payload, f"{type(exc).__name__}: {exc}")
                continue
            out.append((entry_id, message))
        return out

    def dead_letter(self, stream: str, group: str, entry_id: str, payload: bytes | BaseModel, error: str) -> None:
        """Move an entry `group` read from `stream` but cannot use to `<stream>:dead` with `error` (and
        `payload`, its bytes or its decoded message) and acknowledge it, in one transaction: it is never
        delivered again. Entries that fail to decode or are redelivered too often come here, and so do those
        of consumers whose failure is not a crash: a batch that cannot be scored, a result that can never be
        published (over the codec's limits); the orchestrator ends the run with `error`."""
        if isinstance(payload, BaseModel):
            try:
                payload = encode(payload, self.limits)
            except CodecError:  # it was decoded under these limits, so this does not happen; keep the reason
                payload = b""
        pipe = self.client.pipeline(transaction=True)
        dead = self._stream(self.dead_letter_stream(stream))
        pipe.xadd(dead, {b"stream": stream, b"entry_id": entry_id, b"group": group, b"error": error[:4000],
                         _PAYLOAD: payload})
        self.expire_with(pipe, dead)
        pipe.xack(self._stream(stream), group, entry_id)
        pipe.execute()

    def dead_letters(self, stream: str, count: int = 100) -> list[DeadLetter]:
        """The oldest `count` entries of `stream` that could not be used (not decoded, redelivered too
        often, or dead-lettered by their consumer with `dead_letter`)."""
        rows = self.client.xrange(self._stream(self.dead_letter_stream(stream)), count=count)
        return [
            DeadLetter(
                stream=_text(fields[b"stream"]),
                entry_id=_text(fields[b"entry_id"]),
                error=_text(fields[b"error"]),
                payload=fields[_PAYLOAD],
            )
            for _id, fields in rows
        ]

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge entries after their use is durable; returns how many were pending."""
        if not ids:
            return 0
        return int(self.client.xack(self._stream(stream), group, *ids))

    def ack_consumed(
        self, stream: str, group: str, entry_ids: Sequence[str], consumed_key: str, message_ids: Sequence[str]
    ) -> int:
        """Record message ids as consumed and acknowledge their entries in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        if message_ids:
            pipe.sadd(self.key("consumed", consumed_key), *message_ids)
            self.expire_with(pipe, self.key("consumed", consumed_key))
        if entry_ids:
            pipe.xack(self._stream(stream), group, *entry_ids)
        results = pipe.execute()
        return int(results[-1]) if entry_ids else 0

    def reclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        message_type: type[M],
        min_idle_ms: int,
        count: int = 100,
        max_deliveries: int | None = None,
    ) -> list[tuple[str, M]]:
        """Take over entries other consumers left pending for at least `min_idle_ms` (XAUTOCLAIM).

        With `max_deliveries`, an entry already delivered more often than that (it keeps crashing
        its consumers) goes to the dead-letter stream instead of being handed out again.
        """
        if min_idle_ms < 0:
            raise ValueError(f"min_idle_ms must be >= 0, got {min_idle_ms}")
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        key = self._stream(stream)
        claimed: list[tuple[bytes, dict[bytes, bytes] | None]] = []
        cursor: bytes | str = "0-0"
        while len(claimed) < count:
            start, want = cursor, count - len(claimed)
            response = self._with_group(
                stream, group,
                lambda: self.client.xautoclaim(key, group, consumer, min_idle_ms, start_id=start, count=want),
            )
            cursor, entries = response[0], response[1]
            claimed.extend(entries)
            if _text(cursor) == "0-0":
                break
        if any(raw_id is None for raw_id, _ in claimed):
            # Redis 6.2 hands back entries deleted (trimmed) while pending without their ids.
            claimed = [(raw_id, fields) for raw_id, fields in claimed if raw_id is not None]
            self._release_deleted(stream, group, consumer)
        if max_deliveries is not None and claimed:
            claimed = self._drop_redelivered(stream, group, key, claimed, max_deliveries)
        return self._decode_entries(stream, group, claimed, message_type)

    def keep_alive(self, stream: str, group: str, consumer: str, entry_ids: Sequence[str]) -> int:
        """Mark entries `consumer` is still working on as fresh, so `reclaim` (XAUTOCLAIM after an
        idle time) leaves them to it; their delivery count is unchanged. Entries it no longer holds
        (acknowledged, or taken over by another consumer) are left alone. Returns how many it holds."""
        if not entry_ids:
            return 0
        key = self._stream(stream)
        return int(self._with_group(
            stream, group, lambda: self._keep_alive_script(keys=[key], args=[group, consumer, *entry_ids])))

    def _release_deleted(self, stream: str, group: str, consumer: str, batch: int = 1000) -> None:
        """Acknowledge the entries `consumer` holds that no longer exist in the stream."""
        key = self._stream(stream)
        held = [
            _text(row["message_id"])
            for row in self.client.xpending_range(key, group, "-", "+", batch, consumername=consumer)
        ]
        pipe = self.client.pipeline(transaction=False)
        for entry_id in held:
            pipe.xrange(key, min=entry_id, max=entry_id, count=1)
        gone = [entry_id for entry_id, rows in zip(held, pipe.execute()) if not rows]
        self.ack(stream, group, gone)

    def _drop_redelivered(
        self,
        stream: str,
        group: str,
        key: str,
        claimed: list[tuple[bytes, dict[bytes, bytes] | None]],
        max_deliveries: int,
    ) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        ids = [_text(raw_id) for raw_id, _ in claimed]
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(key, group, min=entry_id, max=entry_id, count=1)
        deliveries = {
            _text(rows[0]["message_id"]): int(rows[0]["times_delivered"]) for rows in pipe.execute() if rows
        }
        keep = []
        for raw_id, fields in claimed:
            entry_id = _text(raw_id)
            times = deliveries.get(entry_id, 0)
            if fields is not None and times > max_deliveries:
                self.dead_letter(
                    stream, group, entry_id, fields.get(_PAYLOAD, b""),
                    f"delivered {times} times, over max_deliveries={max_deliveries}",
                )
            else:
                keep.append((raw_id, fields))
        return keep

    def pending(self, stream: str, group: str) -> int:
        """Entries delivered to the group's consumers and not yet acknowledged."""
        return sum(self.holders(stream, group).values())

    def holders(self, stream: str, group: str) -> dict[str, int]:
        """How many delivered, unacknowledged entries each consumer of the group holds (those holding none left out)."""
        try:
            summary = self.client.xpending(self._stream(stream), group)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return {}
            raise
        return {_text(row["name"]): int(row["pending"]) for row in summary.get("consumers") or []}

    def undelivered(self, stream: str, group: str) -> int:
        """Entries of the stream not yet delivered to any consumer of the group."""
        key = self._stream(stream)
        try:
            groups = self.client.xinfo_groups(key)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        found = next((row for row in groups if _text(row["name"]) == group), None)
        if found is None:
            return self.length(stream)
        if found.get("lag") is not None:  # Redis 7 counts them (None after some deletions)
            return int(found["lag"])
        # Else those after the group's last delivered entry: few, as the run paces its streams.
        return len(self.client.xrange(key, min=f"({_text(found['last-delivered-id'])}", max="+"))

    def length(self, stream: str) -> int:
        """Entries in the stream (acknowledged ones included until trimmed)."""
        return int(self.client.xlen(self._stream(stream)))

    def trim(self, stream: str, maxlen: int, approximate: bool = False) -> int:
        """Drop the oldest entries beyond `maxlen`; returns how many were removed."""
        return int(self.client.xtrim(self._stream(stream), maxlen=maxlen, approximate=approximate))

    # -- exactly-once guard ------------------------------------------------------------------------

    def already_consumed(self, key: str, message_id: str) -> bool:
        return bool(self.client.sismember(self.key("consumed", key), message_id))

    def forget_consumed(self, keys: Sequence[str], message_ids: Sequence[str]) -> None:
        """Drop message ids from the consumed sets `keys`: for ids the consumer recognizes by other means
        (the learner: batches below its finished watermark), so the sets stay small in a long run."""
        if not message_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.srem(self.key("consumed", key), *message_ids)
        pipe.execute()

    def consumed_count(self, key: str) -> int:
        return int(self.client.scard(self.key("consumed", key)))

    # -- run control --------------------------------------------------------------------------------

    def request_stop(self, reason: str = "") -> None:
        self.set_value(self.key("control", "stop"), reason.encode() or b"stop requested")

    def stop_requested(self) -> str | None:
        """The stop reason if a stop was requested, else None."""
        value = self.client.get(self.key("control", "stop"))
        return None if value is None else _text(value)

    def heartbeat(self, role: str, member_id: str) -> float:
        """Record that `member_id` of `role` is alive now; returns the server time used."""
        return float(self._heartbeat_script(keys=[self.key("heartbeat", role)], args=[member_id, self.key_ttl_ms or 0]))

    def heartbeats(self, role: str) -> dict[str, float]:
        """Seconds since each member of `role` last beat, by member id."""
        now = self._server_time()
        rows = self.client.zrange(self.key("heartbeat", role), 0, -1, withscores=True)
        return {_text(member): max(0.0, now - score) for member, score in rows}

    def alive(self, role: str, max_age_s: float) -> list[str]:
        """Members of `role` that beat within the last `max_age_s` seconds."""
        if max_age_s < 0:
            raise ValueError(f"max_age_s must be >= 0, got {max_age_s}")
        cutoff = self._server_time() - max_age_s
        return sorted(_text(m) for m in self.client.zrangebyscore(self.key("heartbeat", role), cutoff, "+inf"))

    def forget(self, role: str, member_id: str) -> None:
        """Remove a member that left cleanly, so it is not reported as dead."""
        self.client.zrem(self.key("heartbeat", role), member_id)

    def _server_time(self) -> float:
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    # -- the run's claim on its namespace ---------------------------------------------------------------

    def claim(self, holder: str, ttl_s: float) -> str | None:
        """Claim this namespace for one run's driver (`holder`: its description) for `ttl_s` seconds, renewed by
        `renew_claim`: two runs in one namespace would delete each other's streams and records. Returns None once
        claimed, else the holder's description. `take_over` below claims one whose holder is known dead."""
        while True:
            if self.client.set(self.key("claim"), holder.encode(), nx=True, px=int(ttl_s * 1000)):
                return None
            current = self.claimed_by()
            if current == holder:  # ours: a SET the client's retry sent again after its reply was lost
                return None
            if current is not None:  # else it lapsed between the two commands: try again
                return current

    def claimed_by(self) -> str | None:
        """The description of the namespace's holder, or None."""
        current = self.client.get(self.key("claim"))
        return None if current is None else _text(current)

    def take_over(self, holder: str, ttl_s: float) -> None:
        """Claim the namespace whoever holds it (a driver known to be dead)."""
        self.client.set(self.key("claim"), holder.encode(), px=int(ttl_s * 1000))

    def renew_claim(self, holder: str, ttl_s: float) -> str | None:
        """Keep the claim for another `ttl_s` seconds (or take it again if it lapsed and nobody took it); returns
        None, or the description of another holder that took it meanwhile."""
        other = _text(self._renew_claim_script(keys=[self.key("claim")], args=[holder, int(ttl_s * 1000)]))
        return other or None

    def release_claim(self, holder: str) -> bool:
        """Give up the claim; False when another run holds it now (the namespace is that run's)."""
        return bool(self._release_claim_script(keys=[self.key("claim")], args=[holder]))

    # -- housekeeping ---------------------------------------------------------------------------------

    def expire_namespace(self, ttl_s: float, batch: int = 1000, keep: tuple[str, ...] = ()) -> int:
        """Give every key of this namespace but the `keep` names (e.g. "claim", which has a TTL of its own) an expiry
        `ttl_s` seconds from now; returns how many keys got one. A key deleted between the SCAN and its PEXPIRE is
        skipped."""
        ttl_ms = max(1, int(ttl_s * 1000))
        return sum(self._pexpire(names, ttl_ms) for names in self._namespace_keys(batch, keep))

    def _pexpire(self, names: list[Any], ttl_ms: int) -> int:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.pexpire(name, ttl_ms)
        return sum(1 for result in pipe.execute() if result)

    def delete_namespace(self, batch: int = 500, keep: tuple[str, ...] = ()) -> int:
        """Delete every key of this namespace (end of a run, tests) but the `keep` names (e.g. "claim"); returns
        how many."""
        deleted = sum(int(self.client.delete(*names)) for names in self._namespace_keys(batch, keep))
        self._known_groups.clear()
        return deleted

    def _namespace_keys(self, batch: int, keep: tuple[str, ...]) -> Iterator[list[Any]]:
        """The keys of this namespace but the `keep` names, `batch` at a time: SCAN's MATCH filters on the server and
        its COUNT bounds each call."""
        kept = {self.key(name).encode() for name in keep}
        names: list[Any] = []
        for name in self.client.scan_iter(match=f"{_escape_glob(self.namespace)}:*", count=batch):
            if name in kept:
                continue
            names.append(name)
            if len(names) >= batch:
                yield names
                names = []
        if names:
            yield names


def _escape_glob(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)

