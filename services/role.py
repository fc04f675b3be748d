"""What every role process shares: its Redis connection, heartbeat, metrics endpoint and stop flag.

The heartbeat runs on its own thread, so a member keeps beating through long work (a big batch
rollout, an optimizer step) and the orchestrator declares it dead only when the process is gone
or hung. The same thread keeps the stream entries the member is working on fresh (`holding`), so
live consumers of its group do not take over a long job as if its owner had died. Roles are plain
classes; the orchestrator turns them into Ray actors, and nothing here needs Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch

from refine.runtime import tune_allocator

from services.broker import Broker, StreamGone
from services.metrics import ROLE_FAMILIES, Metrics, MetricsEndpoint, serve_metrics
from services.redis_server import connect
from services.resilience import TRANSIENT, retry_redis

__all__ = ["RoleRuntime", "member_info"]

logger = logging.getLogger(__name__)


class RoleRuntime:
    """Connection, heartbeat thread and Prometheus endpoint of one role member."""

    def __init__(
        self,
        role: str,
        member_id: str,
        redis_url: str,
        namespace: str,
        metrics_dir: str | None,
        heartbeat_interval_s: float = 1.0,
        threads: int = 1,
        outage_timeout_s: float = 120.0,
        serve_now: bool = True,
        metric_families: Collection[str] | None = None,
        key_ttl_s: float | None = None,
    ) -> None:
        """`serve_now=False`: the member calls `serve_metrics` itself, once its metrics hold what a scrape should
        first see (a resumed learner's run totals: a counter seen at 0, then at the run's total, reads as new
        events to Prometheus' increase() and rate()). `metric_families`: those it exports (default: its role's).
        `key_ttl_s`: the expiry of every Redis key it writes (the run's, services.namespace_claim.key_ttl_s)."""
        if heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {heartbeat_interval_s}")
        tune_allocator()
        # Actors share a few cores: one intra-op thread each unless told otherwise.
        torch.set_num_threads(threads)
        # Library chatter stays at warnings; the roles' own notes (reclaims, drops, stops) are shown.
        logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {member_id} %(levelname)s %(message)s")
        for name in ("learner", "rollout_workers", "services", "reward"):
            logging.getLogger(name).setLevel(logging.INFO)
        self.role = role
        self.member_id = member_id
        # A member may start while Redis restarts: wait for it rather than die at birth.
        self.client = retry_redis(lambda: connect(redis_url), f"{member_id}: connect", outage_timeout_s)
        # The driver made every stream of the run before starting its roles: a member never makes one (one still
        # running while the run's namespace is deleted would leave it behind).
        self.broker = Broker(self.client, namespace, key_ttl_s=key_ttl_s, make_streams=False)
        self.metrics = Metrics(families=ROLE_FAMILIES.get(role) if metric_families is None else metric_families)
        self._metrics_dir = metrics_dir
        self._namespace = namespace
        self.endpoint: MetricsEndpoint | None = None
        self._interval = heartbeat_interval_s
        self._closed = threading.Event()
        if serve_now:
            self.serve_metrics()
        self._held: set[tuple[str, str, str]] = set()  # (stream, group, entry id) being worked on
        self._held_lock = threading.Lock()
        # Who is who, for operators (and fault drills): the process behind each member id.
        record = {"role": role, "pid": os.getpid(), "node": socket.gethostname(), "started_at": f"{time.time():.3f}"}
        retry_redis(lambda: self._register(record), f"{member_id}: register", outage_timeout_s)
        self._beat_once()
        self._thread = threading.Thread(target=self._beat_forever, name=f"heartbeat-{member_id}", daemon=True)
        self._thread.start()

    def _register(self, record: dict[str, str | int]) -> None:
        key = self.broker.key("members", self.member_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=record)
        self.broker.expire_with(pipe, key)
        pipe.execute()

    def serve_metrics(self) -> None:
        """Start the Prometheus endpoint, announced in the run's discovery folder."""
        if self.endpoint is None and not self._closed.is_set():
            self.endpoint = serve_metrics(self.metrics, role=self.role, instance=self.member_id,
                                          discovery_dir=self._metrics_dir, run=self._namespace)

    def _beat_once(self) -> None:
        try:
            self.broker.heartbeat(self.role, self.member_id)
        except TRANSIENT as exc:
            logger.warning("heartbeat of %s failed: %s", self.member_id, exc)

    def _beat_forever(self) -> None:
        while not self._closed.wait(self._interval):
            self._beat_once()
            self._keep_held_alive()

    def _keep_held_alive(self) -> None:
        with self._held_lock:
            held = sorted(self._held)
        for stream, group, entry_id in held:
            try:
                self.broker.keep_alive(stream, group, self.member_id, [entry_id])
            except TRANSIENT as exc:
                logger.warning("keep-alive of %s entry %s failed: %s", stream, entry_id, exc)
            except StreamGone:  # nothing left to keep: the member's own read ends its loop on it
                pass

    @contextmanager
    def holding(self, stream: str, group: str, entry_id: str) -> Iterator[None]:
        """While the block runs, every heartbeat resets the idle time of `entry_id`, which this member
        (its consumer name is the member id) read from `stream` for `group`: other consumers reclaim
        only entries idle for a while, and a long job must not look like one whose owner died."""
        item = (stream, group, entry_id)
        with self._held_lock:
            self._held.add(item)
        try:
            yield
        finally:
            with self._held_lock:
                self._held.discard(item)

    def stop_requested(self) -> bool:
        return self.broker.stop_requested() is not None

    def close(self) -> None:
        """Stop beating, leave the heartbeat set (a clean exit is not a death), withdraw the endpoint."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=5)
        try:
            self.broker.forget(self.role, self.member_id)
        except TRANSIENT:
            pass
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        self.client.close()


def member_info(broker: Broker, member_id: str) -> dict[str, str]:
    """What a member recorded about itself when it started (role, pid, node, started_at)."""
    raw = broker.client.hgetall(broker.key("members", member_id))
    return {key.decode(): value.decode() for key, value in raw.items()}
