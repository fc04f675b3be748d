"""REFINE losses: the clipped policy-gradient loss (verl semantics), KL penalties and NTP (summed in
refine.algorithm.update by the run's lambda_ntp and lambda_nsp).

Policy loss, per token, with ratio r = exp(clamp(new - old, -20, 20)) and advantage A:
    clipped = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))
    loss    = min(clipped, -A * dual_clip)   where A < 0   (dual clip bounds the loss)
            = clipped                          where A >= 0
Statistics (masked token means, detached), as verl reports them:
    clip_fraction      tokens where the clipped term is the larger (the clip is active);
    dual_clip_fraction tokens with A < 0 whose loss the dual clip lowered;
    approx_kl          mean of old - new (the clamped log-ratio, negated): verl's ppo_kl.

Aggregation of a per-token loss matrix [N, k] under mask [N, k]:
    token-mean           sum(loss * mask) / sum(mask)            (over the whole batch)
    seq-mean-token-mean  mean over rollouts of each rollout's masked token mean
    seq-mean-token-sum   mean over rollouts of each rollout's masked token sum
A rollout with an empty mask contributes 0 to the sequence means (verl would divide by zero).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from refine.models.state import is_integer_dtype

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KLKind = Literal["k1", "k2", "k3", "low_var_kl", "abs"]
KL_KINDS: tuple[str, ...] = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs")

_LOG_RATIO_BOUND = 20.0  # verl clamps log-ratios here before exp
_LOW_VAR_KL_BOUND = 10.0  # verl clamps the k3 estimate here


MASKED_MEAN_EPS = 1e-8  # verl's: keeps an empty mask's mean at 0 (the data-parallel slices scale by it too)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values where mask is set; verl's 1e-8 keeps an empty mask at 0."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum() + MASKED_MEAN_EPS)


def aggregate_loss(loss_mat: Tensor, mask: Tensor, agg: AggMode = "token-mean") -> Tensor:
    """Reduce a per-token loss [N, k] to a scalar (see the module docstring)."""
    mask = mask.to(loss_mat.dtype)
    if agg == "token-mean":
        return masked_mean(loss_mat, mask)
    sums = (loss_mat * mask).sum(dim=-1)
    if agg == "seq-mean-token-sum":
        return sums.mean()
    if agg == "seq-mean-token-mean":
        return (sums / mask.sum(dim=-1).clamp(min=1)).mean()
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "low_var_kl") -> Tensor:
    """Per-token KL estimate of the policy from the reference, from sampled-token log-probs.

    k1: log p - log q; k2: (log p - log q)^2 / 2; k3 / low_var_kl: exp(q - p) - (q - p) - 1 with
    the log-ratio clamped to +-20 and the result to +-10 (Schulman's estimator, as verl); abs: |k1|.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must match")
    diff = logprobs - ref_logprobs
    if kind in ("k1", "kl"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("k2", "mse"):
        return 0.5 * diff.square()
    if kind in ("k3", "low_var_kl"):
        log_ratio = (-diff).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        estimate = log_ratio.exp() - log_ratio - 1
        return estimate.clamp(-_LOW_VAR_KL_BOUND, _LOW_VAR_KL_BOUND)
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: AggMode = "token-mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "low_var_kl",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped (and dual-clipped) policy-gradient loss over rollout tokens [N, k].

    advantages are [N] (broadcast to the k tokens) or [N, k]. With `ref_logprobs` and
    kl_coef > 0, kl_coef * aggregate(kl_penalty(new, ref)) is added (verl's use_kl_loss).
    dual_clip=None turns the dual clip off. Returns (loss, stats); stats are detached scalars.
    """
    if new_logprobs.dim() != 2:
        raise ValueError(f"new_logprobs must have shape [N, k], got {tuple(new_logprobs.shape)}")
    if old_logprobs.shape != new_logprobs.shape:
        raise ValueError(
            f"old_logprobs {tuple(old_logprobs.shape)} must match new_logprobs {tuple(new_logprobs.shape)}"
        )
    if advantages.dim() == 1 and advantages.shape[0] == new_logprobs.shape[0]:
        advantages = advantages[:, None]
    elif advantages.shape != new_logprobs.shape:
        raise ValueError(
            f"advantages must be [N] or [N, k] for logprobs {tuple(new_logprobs.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    if mask is None:
        mask = torch.ones_like(new_logprobs)
    elif mask.shape != new_logprobs.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match new_logprobs {tuple(new_logprobs.shape)}")
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if clip_low >= 1:
        raise ValueError(f"clip_low must be < 1 so the lower ratio bound stays positive, got {clip_low!r}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"dual_clip must be > 1 (or None for off), got {dual_clip!r}")
    for name, value in (("new_logprobs", new_logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        if not torch.isfinite(value.detach()).all():
            raise ValueError(f"{name} contains NaN or Inf")
    mask = mask.to(new_logprobs.dtype)
    advantages = advantages.to(new_logprobs.dtype)

    log_ratio = (new_logprobs - old_logprobs).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    stats = {
        "clip_fraction": masked_mean((clipped > unclipped).to(mask.dtype), mask).detach(),
        "approx_kl": masked_mean(-log_ratio, mask).detach(),
    }
    negative = advantages < 0
    if dual_clip is not None:
        bound = -advantages * dual_clip
        lowered = negative & (per_token > bound)
        stats["dual_clip_fraction"] = masked_mean(lowered.to(mask.dtype).expand_as(mask), mask).detach()
        per_token = torch.where(negative, torch.minimum(per_token, bound), per_token)
    else:
        stats["dual_clip_fraction"] = torch.zeros((), dtype=mask.dtype, device=mask.device)

    loss = aggregate_loss(per_token, mask, agg)
    stats["pg_loss"] = loss.detach()
    if ref_logprobs is not None and kl_coef:
        kl = aggregate_loss(kl_penalty(new_logprobs, ref_logprobs, kl_kind), mask, agg)
        stats["kl_loss"] = kl.detach()
        loss = loss + kl_coef * kl
    return loss, stats


def ntp_loss(logits: Tensor, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy over every valid target of every document.

    logits [B, T, V] at position t predict input_ids[:, t+1]; row b's targets are positions
    1 .. lengths[b]-1. The mean is over all targets of the batch (token-mean), as a causal LM's
    loss with padded labels ignored.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, T, V] over input_ids {tuple(input_ids.shape)}")
    batch, width = logits.shape[:2]
    if lengths is None:
        lengths = torch.full((batch,), width, dtype=torch.long, device=logits.device)
    lengths = torch.as_tensor(lengths, device=logits.device)
    if (lengths.shape != (batch,) or not is_integer_dtype(lengths.dtype) or (lengths < 0).any()
            or (lengths > width).any()):
        raise ValueError(f"lengths must be integers in [0, {width}] of shape [{batch}], got {lengths.tolist()}")
    valid = torch.arange(1, width, device=logits.device)[None, :] < lengths[:, None]
    count = int(valid.sum())
    if count == 0:
        raise ValueError(f"no next-token targets: every document is shorter than 2 tokens (lengths {lengths.tolist()})")
    # Padding targets may hold any id; ignore_index keeps them out of the sum and the gather. The last
    # position predicts nothing: its target is ignored too, so the logits are read as one [B*T, V]
    # view with the class axis last, where the softmax is contiguous (2-3x faster on CPU than the
    # class-major [B, V, T-1] view).
    targets = torch.full_like(input_ids, -100, dtype=torch.long)
    targets[:, :-1] = torch.where(valid, input_ids[:, 1:].long(), -100)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.to(dtype).reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum") / count
