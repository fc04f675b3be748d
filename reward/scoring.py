"""Scoring one rollout batch with a registered reward: RolloutBatch -> ScoredBatch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import ValidationError

import reward.functions  # noqa: F401  (registers the task rewards)
from refine.algorithm.rewards import RewardInputs, available_rewards, compute_reward, reward_reads_text
from services.messages import RolloutBatch, ScoredBatch
from services.metrics import Metrics

__all__ = ["Decode", "ScoringError", "check_reward_type", "record_scored", "rewards_summary", "score_batch"]

Decode = Callable[[list[int]], str]


class ScoringError(ValueError):
    """A batch could not be scored: unknown reward, a field the reward needs is missing, bad values."""


def check_reward_type(reward_type: str) -> str:
    """`reward_type` if it is registered, else ScoringError listing the registered ones."""
    if not isinstance(reward_type, str) or reward_type not in available_rewards():
        raise ScoringError(f"unknown reward_type {reward_type!r}; registered: {available_rewards()}")
    return reward_type


def reward_inputs(batch: RolloutBatch, decode: Decode | None = None) -> RewardInputs:
    """Everything the batch offers a reward. With `decode`, the rollouts and their ground-truth
    continuations are also given as text (the continuation is the one reference answer)."""
    rollout_texts = reference_texts = None
    if decode is not None:
        rollout_texts = [decode(row) for row in batch.rollout_tokens.tolist()]
        if batch.ground_truth_tokens is not None:
            reference_texts = [[decode(row)] for row in batch.ground_truth_tokens.tolist()]
    return RewardInputs(
        rollout_tokens=batch.rollout_tokens,
        ground_truth_tokens=batch.ground_truth_tokens,
        rollout_hidden=batch.rollout_hidden,
        ground_truth_hidden=batch.ground_truth_hidden,
        rollout_texts=rollout_texts,
        reference_texts=reference_texts,
    )


def score_batch(batch: RolloutBatch, reward_type: str, decode: Decode | None = None) -> ScoredBatch:
    """Score every rollout of `batch` with the registered reward `reward_type`.

    Text rewards (registered with reads_text=True: qa_f1, substring_match, ...) need `decode` (token
    ids -> text); the others never decode, so ids outside the tokenizer's vocabulary cannot fail them.
    The rewards keep their dtype, at least float32 (float64 hidden states give float64 rewards, as
    in-process scoring does). Raises ScoringError naming the batch, the reward and the missing or
    invalid field.
    """
    if not isinstance(batch, RolloutBatch):
        raise ScoringError(f"batch must be a RolloutBatch, got {type(batch).__name__}")
    check_reward_type(reward_type)
    where = f"rollout batch {batch.rollout_batch_id} (reward {reward_type!r})"
    reads_text = reward_reads_text(reward_type)
    try:
        rewards = compute_reward(reward_type, reward_inputs(batch, decode if reads_text else None))
        rewards = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32)).cpu()
        # Inside the try: a reward's output the message refuses is this batch's error, not a crash.
        return ScoredBatch.from_rollouts(batch, rewards, reward_type)
    except (ValueError, ValidationError) as exc:
        raise ScoringError(f"cannot score {where}: {exc}{_text_hint(exc, reads_text, decode)}") from exc


def _text_hint(exc: Exception, reads_text: bool, decode: Decode | None) -> str:
    if "texts" not in str(exc):
        return ""
    if not reads_text:
        return " (a reward that reads text must be registered with register_reward(name, reads_text=True))"
    if decode is None:
        return " (text rewards need score_batch(..., decode=tokenizer.decode))"
    return ""


def rewards_summary(rewards: torch.Tensor) -> tuple[float, float]:
    """Mean and population std of a reward vector (0 std for one rollout)."""
    values = rewards.detach().to(torch.float64)
    if values.numel() == 0:
        return 0.0, 0.0
    return float(values.mean()), float(values.std(unbiased=False))


def record_scored(metrics: Metrics, reward_type: str, rewards: torch.Tensor, seconds: float) -> None:
    """The metrics of one scored batch, alike for a reward replica and the HTTP API: the batch's reward mean and
    std under its reward type, the seconds the scoring took, one more scored batch."""
    mean, std = rewards_summary(rewards)
    metrics.reward_mean.labels(reward_type=reward_type).set(mean)
    metrics.reward_std.labels(reward_type=reward_type).set(std)
    metrics.reward_latency.observe(seconds)
    metrics.scored_batches.inc()
