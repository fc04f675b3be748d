"""The REFINE loss: lambda_ntp * NTP + lambda_nsp * clipped policy gradient on k-token rollouts.

Three ways to compute the same loss, one signature (`refine_loss`):

- "onepass": one forward with gradient over each document gives the NTP loss and the states at
  the rollout positions; rollout tokens are teacher-forced from those states, all at once. The
  policy loss backpropagates into the document pass through the states (never detached: that
  gradient is part of the loss).
- "reference": the paper code's literal pattern, kept as the correctness oracle: every
  prefix + rollout is run again from scratch to recompute log-probs, separately from the NTP pass.
- "fused" (`fused_refine_step`): on-policy; the learner's own forward also supplies entropies,
  positions, states and first-token logits, so no separate rollout pass exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from refine.algorithm.advantages import group_ids_for, grpo_advantages
from refine.algorithm.losses import MASKED_MEAN_EPS, ntp_loss, policy_loss
from refine.algorithm.rewards import RewardInputs, compute_reward, import_reward_modules
from refine.algorithm.rollout import (
    Rollouts, check_positions, choose_positions, decode, first_token_entropy, ground_truth, prefix_rows,
)
from refine.algorithm.sampling import logprobs_from_logits
from refine.config import RefineConfig
from refine.errors import check_argument_type
from refine.models import FastWeightLM, ModelOutput, ModelState
from refine.models.base import check_token_ids
from refine.runtime import StageTimes, timed_stage


@dataclass
class LossResult:
    loss: Tensor
    ntp_loss: Tensor
    policy_loss: Tensor
    stats: dict[str, float]


def score_rollouts(rollouts: Rollouts, cfg: RefineConfig) -> Tensor:
    """Self-supervised reward of every rollout [N] (cosine, binary or hybrid)."""
    # Half-precision hidden states are compared in float32; float64 ones keep their precision.
    dtype = torch.promote_types(rollouts.hidden.dtype, torch.float32)
    inputs = RewardInputs(
        rollout_tokens=rollouts.tokens, ground_truth_tokens=rollouts.target_tokens,
        rollout_hidden=rollouts.hidden.to(dtype), ground_truth_hidden=rollouts.target_hidden.to(dtype),
    )
    import_reward_modules(cfg.reward_modules)  # a library caller's config too: imported once, then a lookup
    return compute_reward(cfg.reward, inputs)


def rollout_stats(rollouts: Rollouts) -> dict[str, float]:
    stats = {"entropy_selected": float(rollouts.entropies.mean())}
    if rollouts.rewards is not None:
        stats.update(reward_mean=float(rollouts.rewards.mean()), reward_std=float(rollouts.rewards.std(unbiased=False)))
    return stats


def advantages_for(rewards: Tensor | None, rollouts: Rollouts, cfg: RefineConfig) -> Tensor:
    if rewards is None:  # rollouts.rewards before score_rollouts
        raise ValueError("rewards is None: score the rollouts first (rollouts.rewards = score_rollouts(rollouts, cfg))")
    batch, chunks = rollouts.positions.shape
    groups = group_ids_for(batch, chunks, rollouts.num_samples, cfg.groups).to(rewards.device)
    return grpo_advantages(rewards, groups, norm_by_std=cfg.norm_adv_by_std)


def teacher_forced_logprobs(model: FastWeightLM, states: ModelState, first_logits: Tensor, tokens: Tensor,
                            num_samples: int, temperature: float) -> Tensor:
    """Log-probs [N, k] of rollout tokens given the states and predictions at their prefixes.

    states and first_logits have one row per prefix; each is repeated for its n samples. Token 0
    is scored by the prefix's own prediction; tokens 1..k-1 by one batched forward from the states.
    """
    later = None
    if tokens.shape[1] > 1:
        later = model(tokens[:, :-1], state=states.expand(num_samples), output_state=False).logits
    return rollout_logprobs(first_logits, later, tokens, num_samples, temperature)


def rollout_logprobs(first_logits: Tensor, later_logits: Tensor | None, tokens: Tensor, num_samples: int,
                     temperature: float) -> Tensor:
    """Log-probs [N, k] of rollout tokens: token 0 from its prefix's prediction first_logits [P, V]
    (repeated for the n samples), tokens 1..k-1 from later_logits [N, >= k-1, V], the predictions
    after rollout tokens 0..k-2."""
    temperature = temperature if temperature > 0 else 1.0
    first = logprobs_from_logits(first_logits.repeat_interleave(num_samples, 0), tokens[:, 0], temperature)
    if tokens.shape[1] == 1:
        return first[:, None]
    rest = logprobs_from_logits(later_logits[:, :tokens.shape[1] - 1], tokens[:, 1:], temperature)
    return torch.cat([first[:, None], rest], dim=1)


def prefix_end_logits(model: FastWeightLM, out: ModelOutput, positions: Tensor) -> Tensor:
    """The prediction after every prefix [B * c, V], recomputed from the document pass's hidden states.

    Equal to out.logits at those rows; recomputing the few rows sends their gradient into the pass
    through [B, T, D] hidden states instead of a zero-filled [B, T, V] copy of the logits.
    """
    rows, starts = prefix_rows(positions)
    return model.lm_head(out.hidden_states[rows, starts - 1])


def _combine(ntp: Tensor, new_logprobs: Tensor, ref_logprobs: Tensor | None, rollouts: Rollouts,
             advantages: Tensor, cfg: RefineConfig) -> LossResult:
    pg, pg_stats = policy_loss(
        new_logprobs, rollouts.logprobs.to(new_logprobs.dtype), advantages.to(new_logprobs.dtype),
        clip_low=cfg.clip_ratio_low, clip_high=cfg.clip_ratio_high, dual_clip=cfg.dual_clip, agg=cfg.loss_agg,
        ref_logprobs=ref_logprobs, kl_coef=cfg.kl_coef, kl_kind=cfg.kl_type,
    )
    loss = cfg.lambda_ntp * ntp + cfg.lambda_nsp * pg
    stats = {f"pg/{k}": float(v) for k, v in pg_stats.items()}
    stats.update(ntp_loss=float(ntp.detach()), policy_loss=float(pg.detach()), loss=float(loss.detach()))
    return LossResult(loss, ntp, pg, stats)


def _ref_logprobs(ref_model: FastWeightLM | None, input_ids: Tensor, lengths: Tensor, rollouts: Rollouts,
                  cfg: RefineConfig) -> Tensor | None:
    if cfg.kl_coef == 0:
        return None
    if ref_model is None:  # the KL term would be left out without a word
        raise ValueError(f"refine.kl_coef={cfg.kl_coef} needs ref_model, the frozen reference policy of the KL "
                         f"term: pass one, or set refine.kl_coef=0")
    with torch.no_grad():
        out = ref_model(input_ids, lengths=lengths, state_positions=rollouts.positions, output_state=False)
        rows, starts = prefix_rows(rollouts.positions)
        return teacher_forced_logprobs(ref_model, out.position_states, out.logits[rows, starts - 1],
                                       rollouts.tokens, rollouts.num_samples, cfg.temperature)


def onepass_loss(model: FastWeightLM, input_ids: Tensor, lengths: Tensor, rollouts: Rollouts, advantages: Tensor,
                 cfg: RefineConfig, ref_model: FastWeightLM | None = None) -> LossResult:
    out = model(input_ids, lengths=lengths, state_positions=rollouts.positions, output_state=False)
    ntp = ntp_loss(out.logits, input_ids, lengths)
    new_logprobs = teacher_forced_logprobs(model, out.position_states,
                                           prefix_end_logits(model, out, rollouts.positions),
                                           rollouts.tokens, rollouts.num_samples, cfg.temperature)
    ref = _ref_logprobs(ref_model, input_ids, lengths, rollouts, cfg)
    return _combine(ntp, new_logprobs, ref, rollouts, advantages, cfg)


def reference_loss(model: FastWeightLM, input_ids: Tensor, lengths: Tensor, rollouts: Rollouts,
                   advantages: Tensor, cfg: RefineConfig, ref_model: FastWeightLM | None = None) -> LossResult:
    """The literal pattern: an NTP forward, then a fresh forward over each prefix + rollout."""
    out = model(input_ids, lengths=lengths, output_state=False)
    ntp = ntp_loss(out.logits, input_ids, lengths)
    k, n = rollouts.rollout_len, rollouts.num_samples
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    rows, starts = prefix_rows(rollouts.positions)
    new_logprobs = []
    for i in range(rollouts.num_rollouts):
        row, start = int(rows[i // n]), int(starts[i // n])
        sequence = torch.cat([input_ids[row, :start], rollouts.tokens[i]])[None]
        logits = model(sequence, output_state=False).logits[0, start - 1:start + k - 1]
        new_logprobs.append(logprobs_from_logits(logits, rollouts.tokens[i], temperature))
    ref = _ref_logprobs(ref_model, input_ids, lengths, rollouts, cfg)
    return _combine(ntp, torch.stack(new_logprobs), ref, rollouts, advantages, cfg)


def check_rollouts_fit(rollouts: Rollouts, lengths: Tensor) -> None:
    """Refuse rollouts made for other documents than those of `lengths` [B]: another batch size, or positions
    whose prefix and k ground-truth tokens do not lie within the documents."""
    if rollouts.positions.shape[0] != lengths.shape[0]:
        raise ValueError(f"rollouts were made for {rollouts.positions.shape[0]} documents (rollouts.positions "
                         f"{tuple(rollouts.positions.shape)}), but the batch holds {lengths.shape[0]}")
    check_positions(rollouts.positions, lengths, rollouts.rollout_len)


def refine_loss(mode: str, model: FastWeightLM, input_ids: Tensor, lengths: Tensor, rollouts: Rollouts,
                advantages: Tensor, cfg: RefineConfig, ref_model: FastWeightLM | None = None) -> LossResult:
    paths: dict[str, Callable[..., LossResult]] = {"onepass": onepass_loss, "reference": reference_loss}
    if mode not in paths:
        raise ValueError(f"mode={mode!r} must be one of {sorted(paths)} (fused: use fused_refine_step)")
    check_token_ids("input_ids", input_ids, model.config.vocab_size)
    check_rollouts_fit(rollouts, lengths)
    return paths[mode](model, input_ids, lengths, rollouts, advantages, cfg, ref_model)


@dataclass(frozen=True)
class SliceShares:
    """What documents [start, end) of a batch add to each loss term's mean over the whole batch."""

    ntp: float  # of the NTP mean over next-token targets: the slice's share of the targets
    policy: float  # of the policy term (and its KL): see slice_shares

    def of_stat(self, key: str) -> float:
        """The share a loss statistic is weighted by when slices merge: ntp_loss the NTP share, the rest the
        policy's (every other statistic is of the rollouts)."""
        return self.ntp if key == "ntp_loss" else self.policy


def target_share(lengths: Tensor, start: int, end: int) -> float:
    """Documents [start, end)'s share of a batch's next-token targets (length - 1 per document)."""
    targets = (lengths - 1).clamp(min=0).tolist()
    return sum(targets[start:end]) / sum(targets)  # Python floats: a tensor ratio would be float32


def slice_shares(lengths: Tensor, rollouts: Rollouts, start: int, end: int, loss_agg: str) -> SliceShares:
    """The shares of documents [start, end) of a batch (`lengths`, `rollouts`) in its loss terms.

    The NTP term is a mean over next-token targets (length - 1 per document). The policy term's sequence
    means divide by the rollout count (c * n per document): the slice's share of the documents. token-mean
    divides by (tokens + MASKED_MEAN_EPS) (refine.algorithm.losses.masked_mean): the slice's mean times
    (slice tokens + eps) / (batch tokens + eps) is its sum over the batch's divisor, so the slices add up to the
    whole batch's loss to rounding; the plain token share would differ by eps / tokens."""
    ntp = target_share(lengths, start, end)
    if loss_agg != "token-mean":
        return SliceShares(ntp, (end - start) / lengths.shape[0])
    # The policy loss masks no rollout token: its mask sum is the token count.
    slice_tokens = rollouts.tokens[rollouts.rows_of(start, end)].numel()
    return SliceShares(ntp, (slice_tokens + MASKED_MEAN_EPS) / (rollouts.tokens.numel() + MASKED_MEAN_EPS))


def slice_loss(mode: str, model: FastWeightLM, input_ids: Tensor, lengths: Tensor, rollouts: Rollouts,
               advantages: Tensor, cfg: RefineConfig, start: int, end: int,
               ref_model: FastWeightLM | None = None) -> tuple[LossResult, SliceShares]:
    """The `mode` loss ("onepass" or "reference") of documents [start, end) of a batch, each term weighted by the
    slice's share of it (slice_shares), so that the slices of any partition of the batch add up to the whole
    batch's loss and gradient: what data-parallel ranks and gradient accumulation (`train.micro_batches`) sum.
    The returned ntp_loss, policy_loss and stats are the slice's own means."""
    result = refine_loss(mode, model, input_ids[start:end], lengths[start:end], rollouts.documents(start, end),
                         advantages[rollouts.rows_of(start, end)], cfg, ref_model)
    shares = slice_shares(lengths, rollouts, start, end, cfg.loss_agg)
    weighted = cfg.lambda_ntp * shares.ntp * result.ntp_loss + cfg.lambda_nsp * shares.policy * result.policy_loss
    return LossResult(weighted, result.ntp_loss, result.policy_loss, result.stats), shares


def fused_refine_step(model: FastWeightLM, input_ids: Tensor, lengths: Tensor, cfg: RefineConfig,
                      generator: torch.Generator | None = None, ref_model: FastWeightLM | None = None,
                      positions: Tensor | None = None, times: StageTimes | None = None) -> tuple[LossResult, Rollouts]:
    """On-policy REFINE with a single document pass: it selects, samples, scores and trains.

    `positions` overrides the entropy-based choice (used to compare paths on identical rollouts).
    `times` collects seconds per stage (forward, select, states, decode, teacher_forced, score).
    """
    check_argument_type(cfg, RefineConfig, "cfg")
    check_token_ids("input_ids", input_ids, model.config.vocab_size)
    if positions is not None:
        check_positions(positions, lengths, cfg.rollout_len)
    with timed_stage(times, "forward"):
        out = model(input_ids, lengths=lengths, output_state=False, defer_states=True)
        ntp = ntp_loss(out.logits, input_ids, lengths)
    with timed_stage(times, "select"):
        if positions is None:
            positions = choose_positions(out.logits, lengths, cfg, generator)
    with timed_stage(times, "states"):
        first_logits = prefix_end_logits(model, out, positions)
        states = out.states_at(positions)
    n, k = cfg.num_samples, cfg.rollout_len
    with timed_stage(times, "decode"):
        # Decoding skips feeding the last token: the teacher-forced forward below runs all k tokens
        # once, giving both the new log-probs and the rollout hidden states the reward reads.
        tokens, logprobs, _ = decode(model, states.detach(), first_logits.detach(), cfg, generator, with_hidden=False)
    with timed_stage(times, "teacher_forced"):
        forced = model(tokens, state=states.expand(n), output_state=False)
    with timed_stage(times, "score"):
        rollouts = Rollouts(
            positions, tokens, logprobs, forced.hidden_states.detach(),
            *ground_truth(input_ids, out.hidden_states.detach(), positions, k, n),
            first_token_entropy(first_logits, positions), n,
        )
        rollouts.rewards = score_rollouts(rollouts, cfg)
        advantages = advantages_for(rollouts.rewards, rollouts, cfg)
        new_logprobs = rollout_logprobs(first_logits, forced.logits, tokens, n, cfg.temperature)
        ref = _ref_logprobs(ref_model, input_ids, lengths, rollouts, cfg)
        result = _combine(ntp, new_logprobs, ref, rollouts, advantages, cfg)
        result.stats.update(rollout_stats(rollouts))
    return result, rollouts
