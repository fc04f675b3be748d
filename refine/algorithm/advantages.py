"""GRPO advantages: rewards standardized within groups of rollouts.

A(i) = (R_i - mean_g) / (std_g + eps), std the unbiased (Bessel-corrected) standard deviation
over the group, as verl's `compute_grpo_outcome_advantage` (torch.std) computes it; with
norm_by_std off, A(i) = R_i - mean_g (Dr. GRPO). Computed in float64 and returned in the
rewards' dtype.

Deliberate differences from verl, both where verl's result is numerical noise or no baseline:
- a group whose rewards are all equal gets exactly 0 (verl divides float round-off by eps);
- a group of one rollout gets 0 (verl passes its raw reward through, R / (1 + eps));
  `singleton="raw"` reproduces verl.

Rollout order used across the project (`group_ids_for`): doc-major, then position, then
sample, index = (d * c + j) * n + s.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from refine.errors import check_whole_number
from refine.models.state import is_integer_dtype

GroupMode = Literal["document", "position"]
SingletonMode = Literal["zero", "raw"]


def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    singleton: SingletonMode = "zero",
) -> Tensor:
    """Standardize rewards [N] within the groups named by group_ids [N] (any integer labels)."""
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {_describe(rewards)}")
    if not isinstance(group_ids, Tensor) or group_ids.shape != rewards.shape or not is_integer_dtype(group_ids.dtype):
        raise ValueError(
            f"group_ids must be an integer tensor of shape {tuple(rewards.shape)}, got {_describe(group_ids)}"
        )
    if not torch.isfinite(rewards).all():
        bad = int((~torch.isfinite(rewards)).nonzero()[0])
        raise ValueError(f"rewards must be finite; rewards[{bad}] = {rewards[bad].item()}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if singleton not in ("zero", "raw"):
        raise ValueError(f"singleton must be 'zero' or 'raw', got {singleton!r}")
    if not rewards.is_floating_point():  # counts or bools: advantages are fractions, returned in float32
        rewards = rewards.to(torch.float32)
    if rewards.numel() == 0:
        return rewards.clone()

    values = rewards.to(torch.float64)
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1
    count = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
    count.index_add_(0, group, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, group, values)
    mean = total / count
    centered = values - mean[group]
    squares = torch.zeros_like(count).index_add_(0, group, centered.square())
    std = (squares / (count - 1).clamp(min=1)).sqrt()

    advantages = centered / (std[group] + eps) if norm_by_std else centered
    group_max = torch.full_like(count, float("-inf")).scatter_reduce(0, group, values, reduce="amax")
    group_min = torch.full_like(count, float("inf")).scatter_reduce(0, group, values, reduce="amin")
    constant = (group_max == group_min)[group]
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    alone = (count == 1)[group]
    if singleton == "raw":
        raw = values / (1.0 + eps) if norm_by_std else values
        advantages = torch.where(alone, raw, advantages)
    return advantages.to(rewards.dtype)


def group_ids_for(num_docs: int, num_positions: int, num_samples: int, mode: GroupMode = "document") -> Tensor:
    """Group label of each rollout, index (d * c + j) * n + s: LongTensor [num_docs * c * n].

    "document" groups the c * n rollouts of one document (label d); "position" groups the n
    rollouts of one position (label d * c + j).
    """
    for name, value in (("num_docs", num_docs), ("num_positions", num_positions), ("num_samples", num_samples)):
        check_whole_number(value, name, minimum=1)
    rollout = torch.arange(num_docs * num_positions * num_samples)
    if mode == "document":
        return rollout // (num_positions * num_samples)
    if mode == "position":
        return rollout // num_samples
    raise ValueError(f"mode must be 'document' or 'position', got {mode!r}")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return type(value).__name__
