"""A reward-service replica as a service role: `reward.worker.RewardWorker` on the run's streams.

The replica's own loop scores rollouts -> scored, heartbeats as role "reward", reclaims entries a
dead replica left pending and rides out Redis restarts. This wrapper gives it the run's
connection, metrics endpoint and stop flag, and tells it how long "dead" is.
"""

from __future__ import annotations

import json
import threading

from refine.config import RunConfig, run_tokenizer
from reward.worker import HEARTBEAT_ROLE, RewardWorker
from services.resilience import retry_redis
from services.role import RoleRuntime
from services.streams import REWARD_GROUP, ROLLOUTS, SCORED

__all__ = ["ROLE", "RewardReplica"]

ROLE = HEARTBEAT_ROLE

# Rewards computed from tokens and hidden states; every other (task) reward reads text.
_SELF_SUPERVISED = {"cosine", "binary", "hybrid"}


class RewardReplica:
    def __init__(self, config_json: str, replica_id: str, redis_url: str, namespace: str) -> None:
        self.config = config = RunConfig.model_validate_json(config_json)
        self.replica_id = replica_id
        self.runtime = RoleRuntime(ROLE, replica_id, redis_url, namespace, config.service.metrics_discovery_dir)
        decode = None
        if config.refine.reward not in _SELF_SUPERVISED:
            decode = run_tokenizer(config).decode
        self.worker = retry_redis(lambda: RewardWorker(  # it creates its consumer group: Redis may be restarting
            self.runtime.broker, config.refine.reward, rollout_stream=ROLLOUTS, scored_stream=SCORED,
            group=REWARD_GROUP, consumer=replica_id, metrics=self.runtime.metrics, decode=decode,
            holding=lambda entry_id: self.runtime.holding(ROLLOUTS, REWARD_GROUP, entry_id),
        ), f"{replica_id}: start", 120.0)

    def run(self, block_ms: int = 500) -> str:
        """Score until the run's stop flag is set; returns a JSON summary."""
        try:
            self.worker.run(threading.Event(), count=1, block_ms=block_ms, reclaim_interval_s=1.0,
                            reclaim_min_idle_ms=self.config.service.reclaim_idle_ms)
        finally:
            self.runtime.close()
        return json.dumps({"replica_id": self.replica_id, "scored": self.worker.scored_count,
                           "dead_lettered": self.worker.dead_count})
