import math

import pytest
import torch

from refine.algorithm.advantages import group_ids_for, grpo_advantages
from refine.algorithm.rollout import Rollouts
from refine.algorithm.update import advantages_for, rollout_stats
from refine.config import RefineConfig

EPS = 1e-6


def test_hand_computed_groups_use_the_unbiased_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 10.0, 10.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 5, 5, 9, 9])
    adv = grpo_advantages(rewards, groups)
    # Group 0: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> -1, 0, 1 (over 1 + eps).
    # Group 5: mean 2, unbiased std sqrt((4 + 4) / 1) = 2.828427 -> -/+ 2 / 2.828427 = -/+ 0.707107
    #          (the biased std, 2, would give -/+ 1).
    # Group 9: equal rewards -> exactly 0.
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -2 / (math.sqrt(8) + EPS), 2 / (math.sqrt(8) + EPS), 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-12)
    assert adv[5].item() == 0.0 and adv[6].item() == 0.0


def test_without_std_normalization_rewards_are_only_centered():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0])
    adv = grpo_advantages(rewards, torch.tensor([1, 1, 1, 2, 2]), norm_by_std=False)
    # Group 1 mean 3 -> -2, -1, 3; group 2 mean 2 -> -2, 2.
    assert adv.tolist() == pytest.approx([-2.0, -1.0, 3.0, -2.0, 2.0])


def _rollouts(num_docs: int, num_chunks: int, num_samples: int) -> Rollouts:
    rows = num_docs * num_chunks * num_samples
    return Rollouts(
        positions=torch.ones(num_docs, num_chunks, dtype=torch.long), tokens=torch.zeros(rows, 1, dtype=torch.long),
        logprobs=torch.zeros(rows, 1), hidden=torch.zeros(rows, 1, 1),
        target_tokens=torch.zeros(rows, 1, dtype=torch.long), target_hidden=torch.zeros(rows, 1, 1),
        entropies=torch.zeros(num_docs, num_chunks), num_samples=num_samples,
    )


def test_the_updates_advantages_follow_the_configs_norm_adv_by_std() -> None:
    """Without this, advantages_for (what every update path calls with the run's refine config) could ignore
    refine.norm_adv_by_std and always divide by the group std: a run asking for centred rewards (Dr. GRPO's
    choice) would train on normalized ones without a word."""
    rollouts = _rollouts(num_docs=2, num_chunks=1, num_samples=3)  # one group of 3 per document
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 2.0], dtype=torch.float64)
    centred = RefineConfig(num_chunks=1, num_samples=3, norm_adv_by_std=False)
    # Document 0: mean 3 -> -2, -1, 3; document 1: mean 2 -> -2, 2, 0.
    assert advantages_for(rewards, rollouts, centred).tolist() == pytest.approx([-2.0, -1.0, 3.0, -2.0, 2.0, 0.0])
    normalized = RefineConfig(num_chunks=1, num_samples=3)  # the default: over the unbiased std sqrt(7), then 2
    expected = [-2 / (math.sqrt(7) + EPS), -1 / (math.sqrt(7) + EPS), 3 / (math.sqrt(7) + EPS),
                -2 / (2 + EPS), 2 / (2 + EPS), 0.0]
    assert advantages_for(rewards, rollouts, normalized).tolist() == pytest.approx(expected, abs=1e-12)


def test_the_updates_advantages_follow_the_configs_groups() -> None:
    """advantages_for groups by refine.group_by as the config resolves it: per position (auto with n > 1) or per
    document. Without this, every update path could group per document whatever the config said."""
    rollouts = _rollouts(num_docs=1, num_chunks=2, num_samples=2)
    rewards = torch.tensor([1.0, 0.0, 5.0, 4.0], dtype=torch.float64)
    per_position = RefineConfig(num_chunks=2, num_samples=2)  # group_by auto: positions, as the paper's code
    assert per_position.groups == "position"
    expected = grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    assert advantages_for(rewards, rollouts, per_position).tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    per_document = RefineConfig(num_chunks=2, num_samples=2, group_by="document")
    whole = grpo_advantages(rewards, torch.zeros(4, dtype=torch.long))
    assert advantages_for(rewards, rollouts, per_document).tolist() == pytest.approx(whole.tolist(), abs=1e-12)
    assert not torch.allclose(expected, whole)


def test_constant_group_is_exactly_zero_despite_round_off():
    # In float64, (7 * 0.7) / 7 differs from 0.7 by ~1e-16; divided by eps that would be ~1e-10.
    rewards = torch.full((7,), 0.7, dtype=torch.float64)
    assert rewards.sum() / 7 != rewards[0]
    adv = grpo_advantages(rewards, torch.zeros(7, dtype=torch.long))
    assert adv.tolist() == [0.0] * 7


def test_singleton_groups_zero_by_default_raw_like_verl_on_request():
    rewards = torch.tensor([0.7, 1.0, 3.0])
    groups = torch.tensor([4, 8, 8])
    assert grpo_advantages(rewards, groups)[0].item() == 0.0
    raw = grpo_advantages(rewards, groups, singleton="raw")
    assert raw[0].item() == pytest.approx(0.7 / (1 + EPS))
    assert grpo_advantages(rewards, groups, norm_by_std=False, singleton="raw")[0].item() == pytest.approx(0.7)


def test_matches_a_per_group_loop_on_random_data():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(60, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 7, (60,), generator=gen)
    adv = grpo_advantages(rewards, groups)
    for g in groups.unique():
        members = groups == g
        values = rewards[members]
        if values.numel() < 2:
            continue
        expected = (values - values.mean()) / (values.std(unbiased=True) + EPS)
        assert torch.allclose(adv[members], expected, atol=1e-12)


def test_dtype_is_kept():
    adv = grpo_advantages(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([0, 0]))
    assert adv.dtype == torch.bfloat16


def test_group_ids_for_document_and_position_modes():
    # 2 documents x 3 positions x 2 samples, index (d * 3 + j) * 2 + s.
    assert group_ids_for(2, 3, 2, "document").tolist() == [0] * 6 + [1] * 6
    assert group_ids_for(2, 3, 2, "position").tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # The paper's default (n = 1, group = document): all c rollouts of a document share a group.
    assert group_ids_for(3, 8, 1).tolist() == [d for d in range(3) for _ in range(8)]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"rewards\[1\] = nan"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="mode"):
        group_ids_for(1, 2, 3, "sample")
    with pytest.raises(ValueError, match="num_samples must be a whole number >= 1, got 0"):
        group_ids_for(1, 2, 0)
    with pytest.raises(ValueError, match="num_docs must be a whole number, got 1.0"):
        group_ids_for(1.0, 2, 1)


@pytest.mark.parametrize("rewards", [torch.tensor([1, 2, 3, 4]), torch.tensor([True, False, True, True])])
def test_integer_and_bool_rewards_give_the_advantages_of_their_values(rewards):
    """They were computed in float64, then cast back to the rewards' dtype: [0, 0, 0, 0], or all True."""
    groups = torch.tensor([0, 0, 1, 1])
    advantages = grpo_advantages(rewards, groups)
    assert advantages.dtype == torch.float32
    assert torch.equal(advantages, grpo_advantages(rewards.to(torch.float32), groups))
    assert advantages.abs().sum() > 0


def test_the_logged_reward_std_is_the_batchs_population_std() -> None:
    """reward_std (metrics.jsonl, the refine_reward_std gauge) is over all of the step's rollouts, not a sample's
    estimate: for rewards 0 and 1 it is 0.5 (the unbiased one would say 0.707)."""
    rollouts = _rollouts(num_docs=1, num_chunks=1, num_samples=2)
    rollouts.rewards = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert rollout_stats(rollouts) == {"entropy_selected": 0.0, "reward_mean": 0.5, "reward_std": 0.5}
