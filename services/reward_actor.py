"""A reward-service replica as a service role: `reward.worker.RewardWorker` on the run's streams.

The replica's own loop scores rollouts -> scored, heartbeats as role "reward", reclaims entries a
dead replica left pending and rides out Redis restarts. This wrapper gives it the run's
connection, metrics endpoint and stop flag, and tells it how long "dead" is.
"""

from __future__ import annotations

import json
import threading

from refine.algorithm.rewards import check_run_reward, reward_reads_text
from refine.config import RunConfig, run_tokenizer
from reward.worker import HEARTBEAT_ROLE, RewardWorker
from services.namespace_claim import key_ttl_s
from services.role import RoleRuntime
from services.source_digest import check_sources
from services.streams import REWARD_GROUP, ROLLOUTS, SCORED

__all__ = ["ROLE", "RewardReplica"]

ROLE = HEARTBEAT_ROLE


class RewardReplica:
    def __init__(self, config_json: str, replica_id: str, redis_url: str, namespace: str,
                 sources: str | None = None) -> None:
        """`sources`: the driver's SourceStamp (JSON); other sources here refuse the start (services/source_digest)."""
        check_sources(sources)  # first, before the heartbeat: the orchestrator takes the failure for a start's
        self.config = config = RunConfig.model_validate_json(config_json)
        self.replica_id = replica_id
        # This process's registry, before anything starts: the run's reward modules (a custom reward
        # lives in one), then the reward itself.
        check_run_reward(config.refine.reward, config.refine.reward_modules, decodes_text=True)
        self.runtime = RoleRuntime(ROLE, replica_id, redis_url, namespace, config.service.metrics_discovery_dir,
                                   key_ttl_s=key_ttl_s(config))
        # Only a reward that reads text needs the tokenizer (and ids it can decode).
        decode = run_tokenizer(config).decode if reward_reads_text(config.refine.reward) else None
        # It joins the consumer group the driver made on its first read: a role makes no stream (services.role).
        self.worker = RewardWorker(
            self.runtime.broker, config.refine.reward, rollout_stream=ROLLOUTS, scored_stream=SCORED,
            group=REWARD_GROUP, consumer=replica_id, metrics=self.runtime.metrics, decode=decode,
            holding=lambda entry_id: self.runtime.holding(ROLLOUTS, REWARD_GROUP, entry_id),
        )

    def run(self, block_ms: int = 500) -> str:
        """Score until the run's stop flag is set; returns a JSON summary."""
        try:
            self.worker.run(threading.Event(), count=1, block_ms=block_ms, reclaim_interval_s=1.0,
                            reclaim_min_idle_ms=self.config.service.reclaim_idle_ms)
        finally:
            self.runtime.close()
        return json.dumps({"replica_id": self.replica_id, "scored": self.worker.scored_count,
                           "dead_lettered": self.worker.dead_count})
