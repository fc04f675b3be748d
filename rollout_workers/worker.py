"""Rollout worker: documents in, rollout batches tagged with the policy version out.

Loop: pull the newest weights if the learner published a newer version; take one document batch
(first any entry a dead worker left behind, via XAUTOCLAIM, then new ones); pull weights again
(a version may have landed while we waited); roll out; publish the RolloutBatch; only then
acknowledge the documents. While it works, the worker's heartbeat thread keeps the entry fresh, so
a long rollout is not taken over by idle workers. A worker killed anywhere in between leaves the
entry pending (and, with its heartbeat gone, no longer refreshed), and another worker reclaims it.
Rolling a batch out twice is harmless: the rollout batch id is derived from the document batch id
and the learner trains on it once. Rollouts that can never be published (over the codec's
max_message_bytes: a configuration error) are not retried: the documents entry goes to the dead-letter
stream with the reason, acknowledged, the worker goes on, and the orchestrator ends the run with it.
So do documents the model cannot roll out (`unusable_documents`: a token id past its vocabulary, a
document too short for rollouts), checked before the rollout: an entry the orchestrator did not produce
(forged, corrupt) would otherwise kill worker after worker until MAX_DELIVERIES.

Weights come from the Redis weight store (safetensors bytes, versioned, see
services/weight_store.py), not the Ray object store: no live owner is needed (a restarted learner
or worker finds them), nothing is pickled, and it works the same under any Ray cluster.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from refine.config import RunConfig
from refine.algorithm.rollout import batch_generator
from refine.errors import NonFiniteOutputError
from rollout_workers.engines import RolloutEngine, build_engine, engine_owner
from services.codec import CodecError
from services.messages import DocumentBatch, RolloutBatch
from services.namespace_claim import key_ttl_s
from services.resilience import TRANSIENT, OutageTolerance, outage_timeout_s, retry_redis
from services.role import RoleRuntime
from services.source_digest import check_sources
from services.streams import (
    DOCUMENTS, ROLLOUT_GROUP, ROLLOUTS, rollout_batch_id_for, unpublishable_reason, unusable_documents,
)
from services.weight_store import RedisWeightStore

__all__ = ["ROLE", "RolloutWorker", "to_message"]

ROLE = "rollout_worker"
MAX_DELIVERIES = 3

logger = logging.getLogger(__name__)


def to_message(batch: DocumentBatch, rollouts, policy_version: int, worker_id: str) -> RolloutBatch:
    """The wire form of `rollouts` made from `batch` with weights `policy_version`."""
    return RolloutBatch(
        rollout_batch_id=rollout_batch_id_for(batch.batch_id),
        document_batch_id=batch.batch_id,
        policy_version=policy_version,
        worker_id=worker_id,
        num_samples=rollouts.num_samples,
        rollout_len=rollouts.rollout_len,
        positions=rollouts.positions.cpu(),
        entropies=rollouts.entropies.float().cpu(),
        rollout_tokens=rollouts.tokens.cpu(),
        behaviour_logprobs=rollouts.logprobs.float().cpu(),
        rollout_hidden=rollouts.hidden.cpu().contiguous(),
        ground_truth_hidden=rollouts.target_hidden.cpu().contiguous(),
        ground_truth_tokens=rollouts.target_tokens.cpu().contiguous(),
    )


class RolloutWorker:
    """One rollout worker (a Ray actor in the service; a plain object in a notebook)."""

    def __init__(self, config_json: str, worker_id: str, redis_url: str, namespace: str,
                 sources: str | None = None) -> None:
        """`sources`: the driver's SourceStamp (JSON); other sources here refuse the start (services/source_digest)."""
        check_sources(sources)  # first, before the heartbeat: the orchestrator takes the failure for a start's
        self.config = RunConfig.model_validate_json(config_json)
        service = self.config.service
        self.worker_id = worker_id
        # As many intra-op threads as whole CPUs reserved for it (at least one).
        self.runtime = RoleRuntime(ROLE, worker_id, redis_url, namespace, service.metrics_discovery_dir,
                                   threads=max(1, int(service.worker_cpus)), key_ttl_s=key_ttl_s(self.config))
        self.broker = self.runtime.broker
        self.metrics = self.runtime.metrics
        self.weights = RedisWeightStore(self.runtime.client, namespace)
        self.engine: RolloutEngine = build_engine(self.config, owner=engine_owner(namespace, worker_id))
        self.version: int | None = None
        self.outage_timeout_s = outage_timeout_s(service.heartbeat_timeout_s)
        self.batches = 0
        self.dead_lettered = 0  # document batches that could never be rolled out, or their rollouts published
        # The first and latest policy version rolled out with (not every one: a long run makes millions).
        self.versions: tuple[int, int] | None = None

    # -- steps ----------------------------------------------------------------------------------

    def refresh_weights(self) -> bool:
        """Load the newest published weights if they differ from ours; True if loaded."""
        latest = self.weights.latest_version()
        if latest is None or latest == self.version:
            return False
        started = time.perf_counter()
        version, state_dict = self.weights.fetch()  # the newest, even if `latest` was pruned meanwhile
        self.engine.load_weights(state_dict, version)
        self.version = version
        self.metrics.weight_version.set(version)
        self.metrics.step_seconds.labels(phase="weight_fetch").observe(time.perf_counter() - started)
        return True

    def next_batch(self, block_ms: int) -> tuple[str, DocumentBatch] | None:
        # A batch that keeps killing its workers goes to the dead-letter stream after a few tries.
        claimed = self.broker.reclaim(DOCUMENTS, ROLLOUT_GROUP, self.worker_id, DocumentBatch,
                                      min_idle_ms=self.config.service.reclaim_idle_ms, count=1,
                                      max_deliveries=MAX_DELIVERIES)
        if claimed:
            logger.info("reclaimed document batch %s", claimed[0][1].batch_id)
            return claimed[0]
        fresh = self.broker.consume(DOCUMENTS, ROLLOUT_GROUP, self.worker_id, DocumentBatch, count=1,
                                    block_ms=block_ms)
        return fresh[0] if fresh else None

    def rollout(self, batch: DocumentBatch) -> RolloutBatch:
        assert self.version is not None
        started = time.perf_counter()
        cursor = batch.cursor
        generator = batch_generator(self.config.train.seed, cursor.epoch, cursor.offset, self.config.train.device)
        with torch.no_grad():
            rollouts = self.engine.rollout(batch.token_ids, batch.lengths, generator)
        message = to_message(batch, rollouts, self.version, self.worker_id)
        self.metrics.step_seconds.labels(phase="rollout").observe(time.perf_counter() - started)
        self.metrics.selected_entropy.set(float(rollouts.entropies.mean()))
        return message

    def run_once(self, block_ms: int = 500) -> bool:
        """Handle at most one document batch; True if one was rolled out and published (False also for
        one dead-lettered because it cannot be rolled out or its rollouts cannot be published)."""
        self.refresh_weights()
        if self.version is None:
            time.sleep(min(block_ms, 100) / 1000)  # the learner has not published yet
            return False
        item = self.next_batch(block_ms)
        if item is None:
            return False
        entry_id, batch = item
        problem = unusable_documents(batch, self.config)
        if problem is not None:  # every worker would fail on it the same way: not retried
            self.dead_letter(entry_id, batch, f"rollout worker {self.worker_id} cannot roll out document batch "
                                              f"{batch.batch_id}: {problem}")
            return False
        # Our heartbeat thread keeps the entry fresh while we work: idle workers must not reclaim a long
        # rollout (done twice, and with enough workers dead-lettered after MAX_DELIVERIES).
        with self.runtime.holding(DOCUMENTS, ROLLOUT_GROUP, entry_id):
            self.refresh_weights()
            try:
                message = self.rollout(batch)
            except NonFiniteOutputError as exc:  # these weights give it every time: a retry would fail the same
                self.dead_letter(entry_id, batch, f"rollout worker {self.worker_id} cannot roll out document batch "
                                                  f"{batch.batch_id} at weight version {self.version}: the model's "
                                                  f"{exc}")
                return False
            try:
                retry_redis(lambda: self.broker.publish(ROLLOUTS, message), "publish rollouts", self.outage_timeout_s)
            except CodecError as exc:  # too large (or unsendable) for the codec: every retry would fail the same
                reason = unpublishable_reason(message, exc)
                self.dead_letter(entry_id, batch, f"rollout worker {self.worker_id} could not publish the rollouts of "
                                                  f"document batch {batch.batch_id}: {reason}")
                return False
            # Acknowledged only now that the rollouts are in Redis.
            retry_redis(lambda: self.broker.ack(DOCUMENTS, ROLLOUT_GROUP, [entry_id]), "ack documents",
                        self.outage_timeout_s)
        # Counted once published: the rollouts of a batch dead-lettered because they cannot be sent reach no one.
        self.metrics.rollout_batches.inc()
        self.metrics.rollouts.inc(message.num_rollouts)
        self.metrics.rollout_tokens.inc(message.num_rollouts * message.rollout_len)
        self.batches += 1
        first = message.policy_version if self.versions is None else self.versions[0]
        self.versions = (first, message.policy_version)
        return True

    def dead_letter(self, entry_id: str, batch: DocumentBatch, reason: str) -> None:
        """`batch` can never be rolled out, or its rollouts never published (`reason`): dead-letter its documents
        entry with the reason, acknowledged, rather than die and have it redelivered to worker after worker until
        MAX_DELIVERIES. The orchestrator ends the run with the reason."""
        logger.error("dead-lettering document batch %s (entry %s): %s", batch.batch_id, entry_id, reason)
        retry_redis(lambda: self.broker.dead_letter(DOCUMENTS, ROLLOUT_GROUP, entry_id, batch, reason),
                    "dead-letter documents", self.outage_timeout_s)
        self.dead_lettered += 1

    # -- loop -----------------------------------------------------------------------------------

    def run(self, block_ms: int = 500) -> str:
        """Work until the run's stop flag is set; returns a JSON summary."""
        outage = OutageTolerance(self.worker_id, self.outage_timeout_s)
        try:
            while True:
                try:
                    if self.runtime.stop_requested():
                        break
                    self.run_once(block_ms)
                    outage.succeeded()
                except TRANSIENT as exc:
                    outage.failed(exc)
        finally:
            self.engine.close()  # a vLLM engine's staged checkpoints live in a temporary folder otherwise left behind
            self.runtime.close()
        return json.dumps({"worker_id": self.worker_id, "batches": self.batches,
                           "first_version": self.versions[0] if self.versions else None,
                           "last_version": self.versions[1] if self.versions else None})
