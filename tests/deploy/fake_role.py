"""A stand-in for one role process: serves services.metrics with plausible values, announced for Prometheus.

Run as `python tests/deploy/fake_role.py --role learner --instance 0 --discovery-dir DIR --run RUN`. It prints
one JSON line {"host", "port", "discovery_file"} once it is served and announced, then serves until
its standard input closes, and removes its discovery file on the way out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from services.metrics import Metrics, serve_metrics


def update_orchestrator(metrics: Metrics) -> None:
    metrics.documents.inc(8)
    metrics.weight_version.set(3)
    metrics.stream_length.labels(stream="documents").set(4)
    metrics.stream_length.labels(stream="rollouts").set(2)
    metrics.stream_pending.labels(stream="rollouts", group="reward").set(1)
    metrics.stream_pending.labels(stream="scored", group="learner").set(2)


def update_rollout_worker(metrics: Metrics) -> None:
    metrics.rollouts.inc(16)
    metrics.rollout_tokens.inc(128)
    metrics.rollout_batches.inc(2)
    metrics.selected_entropy.set(2.5)
    metrics.weight_version.set(3)
    metrics.step_seconds.labels(phase="rollout").observe(0.4)


def update_reward(metrics: Metrics) -> None:
    metrics.reward_mean.labels(reward_type="cosine").set(0.6)
    metrics.reward_mean.labels(reward_type="exact_match").set(0.25)
    metrics.reward_std.labels(reward_type="cosine").set(0.1)
    metrics.reward_std.labels(reward_type="exact_match").set(0.4)
    metrics.reward_latency.observe(0.02)
    metrics.scored_batches.inc(2)


def update_learner(metrics: Metrics) -> None:
    metrics.learner_steps.inc(3)
    metrics.learner_step.set(3)
    metrics.policy_loss.set(-0.01)
    metrics.ntp_loss.set(2.3)
    metrics.eval_ntp_loss.set(2.4)
    metrics.clip_fraction.set(0.05)
    metrics.approx_kl.set(0.002)
    metrics.grad_norm.set(1.7)
    metrics.learning_rate.set(1e-6)
    metrics.data_epoch.set(1)
    for phase, seconds in (("forward", 0.5), ("backward", 0.9), ("optimizer", 0.05)):
        metrics.step_seconds.labels(phase=phase).observe(seconds)
    metrics.skipped_steps.inc(1)
    metrics.weight_version.set(4)
    metrics.staleness.observe(1)
    metrics.stale_dropped.inc(1)


UPDATES: dict[str, Callable[[Metrics], None]] = {
    "orchestrator": update_orchestrator,
    "rollout_worker": update_rollout_worker,
    "reward": update_reward,
    "learner": update_learner,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", required=True, choices=sorted(UPDATES))
    parser.add_argument("--instance", required=True)
    parser.add_argument("--discovery-dir", required=True)
    parser.add_argument("--run", required=True, help="the run label every role of one service run shares")
    args = parser.parse_args()

    metrics = Metrics()
    UPDATES[args.role](metrics)
    endpoint = serve_metrics(metrics, args.role, args.instance, args.discovery_dir, bind="127.0.0.1",
                             run=args.run)
    try:
        print(json.dumps({"host": endpoint.host, "port": endpoint.port,
                          "discovery_file": str(endpoint.discovery_file)}), flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin
    finally:
        endpoint.close()


if __name__ == "__main__":
    main()
