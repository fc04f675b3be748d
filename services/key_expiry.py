"""The expiry of a service run's Redis keys, refreshed while the run lives.

Every key of the run's namespace but the claim (which has a TTL of its own) expires service.key_ttl_s after it was
last written or refreshed: a driver killed without cleaning up (SIGKILL, a forced `ray job stop`, a node lost)
leaves no streams or weights (gigabytes) in a shared Redis for good. The refresh runs on a thread of the driver's
own, not in its loop: a step of the loop that blocks for long (a large corpus built on the first batch, a slow stop)
must not let a live run's keys expire. Only a driver whose whole process stalls (suspended, swapped out) or that is
cut off from Redis longer than the keys' TTL loses them, and `expired_after_s` then says so.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from services.broker import Broker
from services.redis_server import connect

__all__ = ["KEY_REFRESH_S", "KeyExpiryKeeper"]

logger = logging.getLogger(__name__)

# How often at most the keys' expiry is refreshed: each refresh SCANs the whole keyspace (~0.9 s of Redis' time with
# a million keys of other users), too much for every few seconds in a large shared Redis.
KEY_REFRESH_S = 60.0


class KeyExpiryKeeper:
    """Gives every key of `namespace` but the claim an expiry `ttl_s` from now, at `start` and then every
    min(KEY_REFRESH_S, ttl_s / 3) on a thread until `stop`, through a Redis connection of its own."""

    def __init__(self, redis_url: str, namespace: str, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.interval_s = min(KEY_REFRESH_S, ttl_s / 3)
        self.broker = Broker(connect(redis_url), namespace)
        self._lock = threading.Lock()
        self._refreshed_at: float | None = None  # time.monotonic() of the last refresh
        self._longest_gap_s = 0.0  # between two refreshes since the run's state was last found whole
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._refresh_until_stopped, name="refine-key-expiry", daemon=True)

    def start(self) -> None:
        """The first refresh here (a Redis error raises to the caller), the rest on the thread."""
        self.refresh()
        self._thread.start()

    def refresh(self) -> None:
        self.broker.expire_namespace(self.ttl_s, keep=("claim",))
        now = time.monotonic()
        with self._lock:
            if self._refreshed_at is not None:
                self._longest_gap_s = max(self._longest_gap_s, now - self._refreshed_at)
            self._refreshed_at = now

    def _refresh_until_stopped(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.refresh()
            except (redis.RedisError, OSError) as exc:  # an outage: the run's loop rides it out or ends the run
                logger.debug("could not refresh the expiry of namespace %s's keys: %s", self.broker.namespace, exc)

    def found_whole(self) -> None:
        """The run's state was found whole in Redis: a gap between refreshes before now took nothing."""
        with self._lock:
            self._longest_gap_s = 0.0

    def expired_after_s(self) -> float | None:
        """The longest time the keys went without a refresh since the run's state was last found whole, up to now,
        when longer than their TTL (they expired meanwhile); else None."""
        with self._lock:
            if self._refreshed_at is None:
                return None
            gap = max(self._longest_gap_s, time.monotonic() - self._refreshed_at)
        return gap if gap > self.ttl_s else None

    def stop(self) -> None:
        """No refresh after this returns but one under way, which a deleted namespace makes a no-op (PEXPIRE creates
        no key); waits for it briefly (a SCAN of a large keyspace, a Redis cut off)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.broker.client.close()
