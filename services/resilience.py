"""Riding out a Redis restart: transient errors are retried until a deadline.

Every role loop catches `TRANSIENT` errors and retries its iteration. Work that is expensive to
redo (a rollout, an optimizer step) finishes its Redis writes with `retry_redis`, so a restart
between computing and publishing neither loses the result nor repeats the work. Redis with
append-only persistence comes back with every acknowledged write (streams, pending entries,
consumer groups, consumed sets, weights), so retrying the interrupted command is all it takes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

__all__ = ["TRANSIENT", "OutageTolerance", "RedisOutage", "outage_timeout_s", "retry_redis"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,  # still replaying its append-only file after a restart
    ConnectionError,
)


class RedisOutage(RuntimeError):
    """Redis stayed unreachable for longer than the configured tolerance: `elapsed_s` seconds."""

    def __init__(self, message: str, elapsed_s: float):
        super().__init__(message)
        self.elapsed_s = elapsed_s

    def __reduce__(self):  # Ray sends a role's exception to the driver: keep both arguments
        return type(self), (str(self), self.elapsed_s)


class RedisStateLost(RuntimeError):
    """Redis answers but no longer holds state of this run that it held (restarted without persistence, flushed,
    or killed before its append-only file had its last writes): the run cannot go on from it."""


def outage_timeout_s(heartbeat_timeout_s: float) -> float:
    """How long the run rides out a Redis outage before giving up: the driver and the learner use the
    same rule, so neither waits for Redis long after the other gave up. At least a minute: a Redis
    restart replaying its append-only file takes a while."""
    return max(60.0, 4 * heartbeat_timeout_s)


def retry_redis(fn: Callable[[], T], what: str, timeout_s: float = 120.0, max_backoff_s: float = 2.0) -> T:
    """`fn()`, retried on transient Redis errors for up to `timeout_s` seconds.

    `fn` must be safe to repeat: a command whose reply was lost may already have run.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    backoff = 0.05
    while True:
        try:
            return fn()
        except TRANSIENT as exc:
            now = time.monotonic()
            if now >= deadline:
                # The time it took: a command that hangs until its socket timeout can overrun the tolerance.
                raise RedisOutage(f"{what}: Redis unreachable for {now - start:.0f}s ({timeout_s:.0f}s tolerated; "
                                  f"{type(exc).__name__}: {exc})", now - start) from exc
            pause = min(backoff, deadline - now)  # the last try comes at the deadline, not before it
            logger.warning("%s: Redis unavailable (%s), retrying in %.2fs", what, exc, pause)
            time.sleep(pause)
            backoff = min(max_backoff_s, backoff * 2)


class OutageTolerance:
    """For role loops: how long iterations have kept failing on Redis; past `timeout_s`, give up."""

    def __init__(self, who: str, timeout_s: float, pause_s: float = 0.25):
        self.who, self.timeout_s, self.pause_s = who, timeout_s, pause_s
        self.since: float | None = None

    def succeeded(self) -> None:
        self.since = None

    def record(self, exc: BaseException) -> bool:
        """Note a failed iteration without pausing; raises RedisOutage once Redis has been gone too long.
        Returns True for the first failure of an outage (say it once, not on every retry)."""
        first = self.since is None
        if self.since is None:
            self.since = time.monotonic()
        elapsed = time.monotonic() - self.since
        if elapsed > self.timeout_s:
            raise RedisOutage(f"{self.who}: Redis unreachable for {elapsed:.0f}s ({self.timeout_s:.0f}s tolerated)",
                              elapsed) from exc
        return first

    def failed(self, exc: BaseException) -> None:
        """Pause before the retry, or raise RedisOutage once Redis has been gone too long."""
        self.record(exc)
        logger.warning("%s: Redis unavailable (%s); retrying", self.who, exc)
        time.sleep(self.pause_s)
