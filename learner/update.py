"""One learner update from a scored rollout batch (disaggregated) or a document batch (colocated).

Disaggregated: the rollouts arrive as a ScoredBatch; the learner rebuilds a `Rollouts` object,
standardizes the rewards into GRPO advantages, and runs the one-pass loss: one forward with
gradient over the documents gives the NTP loss and the states at the rollout positions, from which
the rollout tokens are teacher-forced. Colocated: the fused on-policy step (the learner's own
forward also selects positions and samples), so no rollout pass exists at all.
"""

from __future__ import annotations

import torch

from refine.algorithm.rollout import Rollouts
from refine.config import RunConfig
from refine.models import FastWeightLM
from refine.runtime import StageTimes
from refine.step import StepResult, fused_step, rollout_batch_update
from services.messages import ScoredBatch

__all__ = ["LEARNER_PHASES", "fused_update", "onepass_update", "rollouts_from_batch"]

# What a learner step reports as `<phase>_seconds` (the learner's refine_step_seconds{phase}): the one-pass
# loss as "forward", or the fused step's own stages; then backward, clipping and the optimizer step. Each
# is waited for on the device, so on a GPU a phase's queued work counts in that phase.
LEARNER_PHASES = ("forward", "select", "states", "decode", "teacher_forced", "score", "backward_step")


def rollouts_from_batch(batch: ScoredBatch, device: str | torch.device = "cpu") -> Rollouts:
    """The learner's view of a scored batch. Hidden states are the reward's input, not the loss's:
    they are passed through when present and empty otherwise."""
    empty = torch.zeros(batch.num_rollouts, batch.rollout_len, 0)
    return Rollouts(
        positions=batch.positions.to(device, torch.long),
        tokens=batch.rollout_tokens.to(device, torch.long),
        logprobs=batch.behaviour_logprobs.to(device),
        hidden=(batch.rollout_hidden if batch.rollout_hidden is not None else empty).to(device),
        target_tokens=(batch.ground_truth_tokens if batch.ground_truth_tokens is not None
                       else torch.zeros_like(batch.rollout_tokens)).to(device, torch.long),
        target_hidden=(batch.ground_truth_hidden if batch.ground_truth_hidden is not None else empty).to(device),
        entropies=batch.entropies.to(device),
        num_samples=batch.num_samples,
        policy_version=batch.policy_version,
        # The rewards keep their dtype (float64 from the reward service): the advantages are computed in
        # float64 and cast to the policy's log-prob dtype in the loss, as in the single-process loop.
        rewards=batch.rewards.to(device),
    )


def onepass_update(model: FastWeightLM, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                   lengths: torch.Tensor, rollouts: Rollouts, config: RunConfig,
                   ref_model: FastWeightLM | None = None) -> StepResult:
    """Advantages, then per mini-batch (`train.mini_batches`) the one-pass loss, backward, clip, step (skipped
    when not finite); timed by phase."""
    assert rollouts.rewards is not None, "the learner trains on scored rollouts only"
    times = StageTimes(input_ids.device)
    outcome = rollout_batch_update("onepass", model, optimizer, input_ids, lengths, rollouts, config, ref_model, times)
    outcome.stats.update(times.stats())
    return outcome


def fused_update(model: FastWeightLM, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                 lengths: torch.Tensor, config: RunConfig, generator: torch.Generator,
                 ref_model: FastWeightLM | None = None) -> StepResult:
    """The colocated on-policy step: select, sample, score and train from one document pass."""
    times = StageTimes(input_ids.device)
    outcome = fused_step(model, optimizer, input_ids, lengths, config.refine, config.optim.grad_clip, generator,
                         ref_model, times)
    outcome.stats.update(times.stats())
    return outcome
