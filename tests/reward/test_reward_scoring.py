"""score_batch: a RolloutBatch in, a ScoredBatch with one reward per rollout out."""

import math

import pytest
import torch

from refine.algorithm.rewards import cosine_reward
from reward.scoring import ScoringError, score_batch
from services.messages import RolloutBatch, ScoredBatch

# Two rollouts (B = 1, c = 2, n = 1), k = 2, D = 2: the hand-made vectors of the reward-math tests.
ROLLOUT_HIDDEN = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [-2.0, 0.0]]])
TRUTH_HIDDEN = torch.tensor([[[5.0, 0.0], [1.0, 1.0]], [[-1.0, 0.0], [-1.0, 0.0]]])
COSINE = [(1 + 1 / math.sqrt(2)) / 2, 0.0]
ROLLOUT_TOKENS = torch.tensor([[4, 7], [1, 1]])
TRUTH_TOKENS = torch.tensor([[4, 8], [1, 1]])
BINARY = [0.5, 1.0]
WORDS = ["paris", "is", "the", "capital", "london", "rome", "of", "france", "italy"]


def decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def batch(hidden: bool = True, truth: bool = True) -> RolloutBatch:
    return RolloutBatch(
        document_batch_id="doc-1",
        policy_version=3,
        worker_id="rollout-0",
        num_samples=1,
        rollout_len=2,
        positions=torch.tensor([[40, 90]]),
        entropies=torch.tensor([[1.5, 0.5]]),
        rollout_tokens=ROLLOUT_TOKENS,
        behaviour_logprobs=torch.full((2, 2), -0.5),
        rollout_hidden=ROLLOUT_HIDDEN if hidden else None,
        ground_truth_hidden=TRUTH_HIDDEN if hidden else None,
        ground_truth_tokens=TRUTH_TOKENS if truth else None,
    )


@pytest.mark.parametrize(
    "reward_type, expected",
    [("cosine", COSINE), ("binary", BINARY), ("hybrid", [c + b for c, b in zip(COSINE, BINARY)])],
)
def test_self_supervised_rewards(reward_type, expected):
    source = batch()
    scored = score_batch(source, reward_type)
    assert isinstance(scored, ScoredBatch)
    assert scored.reward_type == reward_type
    assert scored.rewards.dtype == torch.float32
    assert scored.rewards.tolist() == pytest.approx(expected, abs=1e-6)
    # Everything the learner needs travels on unchanged.
    assert scored.rollout_batch_id == source.rollout_batch_id
    assert scored.policy_version == 3
    assert torch.equal(scored.rollout_tokens, source.rollout_tokens)
    assert torch.equal(scored.behaviour_logprobs, source.behaviour_logprobs)


def test_random_batch_matches_the_reward_math(make_batch):
    source = make_batch(seed=5, docs=2, chunks=3, samples=2, k=4, dim=6)
    scored = score_batch(source, "cosine")
    assert scored.rewards.shape == (12,)
    expected = cosine_reward(source.rollout_hidden, source.ground_truth_hidden).float()
    torch.testing.assert_close(scored.rewards, expected)


def test_text_rewards_decode_rollouts_and_ground_truth():
    # Row 0: "london france" vs "london italy": F1 = 0.5, no substring; row 1: "is is" both times.
    scored = score_batch(batch(), "qa_f1", decode=decode)
    assert scored.rewards.tolist() == pytest.approx([0.5, 1.0])
    scored = score_batch(batch(), "substring_match", decode=decode)
    assert scored.rewards.tolist() == [0.0, 1.0]


def test_missing_fields_are_named():
    source = batch(hidden=False)
    with pytest.raises(ScoringError, match=r"rollout_hidden.*ground_truth_hidden") as info:
        score_batch(source, "cosine")
    assert source.rollout_batch_id in str(info.value)
    with pytest.raises(ScoringError, match="ground_truth_tokens"):
        score_batch(batch(truth=False), "binary")
    with pytest.raises(ScoringError, match=r"rollout_texts.*decode"):
        score_batch(batch(), "qa_f1")
    with pytest.raises(ScoringError, match="reference_texts"):
        score_batch(batch(truth=False), "qa_f1", decode=decode)


def test_unknown_reward_and_wrong_input():
    with pytest.raises(ScoringError, match=r"unknown reward_type 'nope'.*cosine"):
        score_batch(batch(), "nope")
    with pytest.raises(ScoringError, match="RolloutBatch"):
        score_batch({"rollout_tokens": [[1]]}, "binary")  # type: ignore[arg-type]
