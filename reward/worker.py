"""A reward-service replica: consume rollout batches, score them, publish scored batches.

Several replicas share one consumer group (each with its own consumer name), so Redis hands each
rollout batch to one of them. A batch is acknowledged only after its scored batch was published;
if a replica dies in between, another one reclaims the entry and scores it again (the learner's
exactly-once guard keys on `rollout_batch_id`, which the scored batch keeps). A batch that cannot be
scored, or whose scored batch can never be published (over the codec's max_message_bytes), goes to the
dead-letter stream `<rollout_stream>:dead` with the error, and is acknowledged: the replica goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext

import redis

from reward.scoring import Decode, check_reward_type, record_scored, score_batch
from services.broker import Broker
from services.codec import CodecError
from services.messages import RolloutBatch
from services.metrics import Metrics
from services.streams import unpublishable_reason

__all__ = ["HEARTBEAT_ROLE", "RewardWorker"]

logger = logging.getLogger(__name__)

HEARTBEAT_ROLE = "reward"


class RewardWorker:
    """One replica of the reward service on a Redis Streams broker."""

    def __init__(
        self,
        broker: Broker,
        reward_type: str,
        rollout_stream: str = "rollouts",
        scored_stream: str = "scored",
        group: str = "reward",
        *,
        consumer: str,
        metrics: Metrics | None = None,
        decode: Decode | None = None,
        max_deliveries: int | None = 5,
        scored_maxlen: int | None = None,
        holding: Callable[[str], AbstractContextManager[None]] | None = None,
    ) -> None:
        check_reward_type(reward_type)
        for name, value in (("rollout_stream", rollout_stream), ("scored_stream", scored_stream),
                            ("group", group), ("consumer", consumer)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if rollout_stream == scored_stream:
            raise ValueError(f"rollout_stream and scored_stream must differ, both are {rollout_stream!r}")
        if max_deliveries is not None and max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1 or None, got {max_deliveries}")
        self.broker = broker
        self.reward_type = reward_type
        self.rollout_stream = rollout_stream
        self.scored_stream = scored_stream
        self.group = group
        self.consumer = consumer
        self.metrics = metrics
        self.decode = decode
        self.max_deliveries = max_deliveries
        self.scored_maxlen = scored_maxlen
        # Keeps an entry fresh while it is scored, so other replicas do not reclaim a slow batch as a
        # dead replica's (the service passes its RoleRuntime.holding); none: scoring is quick.
        self.holding = holding or (lambda entry_id: nullcontext())
        self.scored_count = 0
        self.dead_count = 0

    # -- one step ---------------------------------------------------------------------------------

    def run_once(self, count: int = 4, block_ms: int | None = 500) -> int:
        """Consume up to `count` new rollout batches and handle them; returns how many were handled
        (scored or dead-lettered). Redis errors propagate; unacknowledged entries stay pending."""
        entries = self.broker.consume(
            self.rollout_stream, self.group, self.consumer, RolloutBatch, count=count, block_ms=block_ms
        )
        return self._handle_all(entries)

    def reclaim(self, min_idle_ms: int, count: int = 100) -> int:
        """Take over and handle entries other replicas left pending for `min_idle_ms` (a dead
        replica's); entries delivered more than `max_deliveries` times go to dead letters."""
        entries = self.broker.reclaim(
            self.rollout_stream, self.group, self.consumer, RolloutBatch,
            min_idle_ms=min_idle_ms, count=count, max_deliveries=self.max_deliveries,
        )
        return self._handle_all(entries)

    def _handle_all(self, entries: list[tuple[str, RolloutBatch]]) -> int:
        # Every entry of a read is held from the start: the later ones wait their turn, and would otherwise look idle
        # (a dead replica's) to the other replicas' reclaim while the earlier ones are scored. Keeping an entry
        # already acknowledged fresh does nothing.
        with ExitStack() as held:
            for entry_id, _ in entries:
                held.enter_context(self.holding(entry_id))
            for entry_id, batch in entries:
                self._score(entry_id, batch)
        return len(entries)

    def _score(self, entry_id: str, batch: RolloutBatch) -> None:
        started = time.perf_counter()
        try:
            scored = score_batch(batch, self.reward_type, decode=self.decode)
        except (Exception, SystemExit) as exc:  # a reward plugin may raise anything (sys.exit too): keep the batch
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("rollout batch %s (entry %s) cannot be scored: %s", batch.rollout_batch_id, entry_id, error)
            self._dead_letter(entry_id, batch, f"scoring with reward {self.reward_type!r} failed: {error}")
            self.dead_count += 1
            return
        # The latency metric is the scoring alone, as the HTTP API measures it; publishing is Redis's time.
        seconds = time.perf_counter() - started
        try:
            self.broker.publish(self.scored_stream, scored, maxlen=self.scored_maxlen)
        except CodecError as exc:  # too large (or unsendable) for the codec: every replica would fail the same
            error = (f"reward replica {self.consumer} could not publish the ScoredBatch of rollout batch "
                     f"{batch.rollout_batch_id}: {unpublishable_reason(scored, exc)}")
            logger.error("rollout batch %s (entry %s) dead-lettered: %s", batch.rollout_batch_id, entry_id, error)
            self._dead_letter(entry_id, batch, error)
            self.dead_count += 1
            return
        # Only now is the scored batch durable in Redis: acknowledging earlier could lose it.
        self.broker.ack(self.rollout_stream, self.group, [entry_id])
        self.scored_count += 1
        self._record(scored.rewards, seconds)

    def _dead_letter(self, entry_id: str, batch: RolloutBatch, reason: str) -> None:
        # The broker's own dead-letter path: the entry is recorded and acknowledged in one transaction,
        # and `broker.dead_letters(rollout_stream)` lists it next to entries that failed to decode.
        self.broker.dead_letter(self.rollout_stream, self.group, entry_id, batch, reason)

    def _record(self, rewards, seconds: float) -> None:
        if self.metrics is None:
            return
        record_scored(self.metrics, self.reward_type, rewards, seconds)

    # -- loop -------------------------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event,
        count: int = 4,
        block_ms: int = 500,
        reclaim_interval_s: float = 10.0,
        reclaim_min_idle_ms: int = 60_000,
        max_backoff_s: float = 5.0,
    ) -> None:
        """Score until `stop` is set or the run's stop is requested. Heartbeats as role "reward";
        every `reclaim_interval_s` takes over entries idle for `reclaim_min_idle_ms`. Redis
        errors are logged and retried with backoff, so a Redis restart does not end the replica."""
        if reclaim_interval_s <= 0:
            raise ValueError(f"reclaim_interval_s must be > 0, got {reclaim_interval_s}")
        next_reclaim = time.monotonic()
        backoff = 0.0
        try:
            while not stop.is_set():
                try:
                    if self.broker.stop_requested() is not None:
                        break
                    self.broker.heartbeat(HEARTBEAT_ROLE, self.consumer)
                    if time.monotonic() >= next_reclaim:
                        self.reclaim(reclaim_min_idle_ms)
                        next_reclaim = time.monotonic() + reclaim_interval_s
                    self.run_once(count=count, block_ms=block_ms)
                    backoff = 0.0
                except (redis.RedisError, OSError) as exc:
                    backoff = min(max_backoff_s, max(0.1, backoff * 2))
                    logger.warning("reward replica %s: Redis error, retrying in %.1fs: %s", self.consumer, backoff, exc)
                    stop.wait(backoff)
        finally:
            try:
                self.broker.forget(HEARTBEAT_ROLE, self.consumer)
            except (redis.RedisError, OSError):
                pass
