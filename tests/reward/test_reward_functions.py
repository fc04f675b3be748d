"""Task rewards in the registry, against hand-computed scores."""

import importlib
import random

import pytest
import torch

import reward.functions
from refine.algorithm.rewards import (
    RewardInputs,
    available_rewards,
    compute_reward,
    get_reward,
    register_reward,
    unregister_reward,
)


def texts(predictions, references) -> RewardInputs:
    return RewardInputs(rollout_texts=predictions, reference_texts=references)


def test_importing_registers_the_task_rewards_next_to_the_self_supervised_ones():
    names = available_rewards()
    for name in ("qa_f1", "substring_match", "cosine", "binary", "hybrid"):
        assert name in names


def test_qa_f1_is_longbench_f1_max_over_gold_answers():
    scores = compute_reward(
        "qa_f1",
        texts(
            ["The cat sat on the mat.", "Paris", "", "blue green"],
            [["a cat on a mat", "dog"], ["paris!", "London"], ["anything"], ["green blue blue"]],
        ),
    )
    # Row 0: normalized "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1 -> 6/7; "dog" -> 0.
    # Row 1: exact after normalization -> 1. Row 2: empty prediction -> 0.
    # Row 3: {blue, green} vs {green, blue, blue}: 2 common, P = 1, R = 2/3 -> 0.8.
    assert scores.tolist() == pytest.approx([6 / 7, 1.0, 0.0, 0.8])
    assert scores.dtype == torch.float32


def test_qa_f1_equals_the_longbench_metric_on_random_texts():
    """The reward normalizes a rollout once for all its gold answers: the same numbers as the metric per answer."""
    from refine.evaluation.metrics import qa_f1_score

    rng = random.Random(0)
    words = ["The", "a", "an", "cat", "Cat.", "mat,", "on", "blue!", "green", "  ", "don't", "x-ray"]
    predictions = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(200)]
    golds = [[" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))] for _ in range(200)]
    golds = [[g if g.strip() else "cat" for g in gold] for gold in golds]  # blank gold answers are refused
    expected = [max(qa_f1_score(p, g) for g in gold) for p, gold in zip(predictions, golds)]
    assert compute_reward("qa_f1", texts(predictions, golds)).tolist() == pytest.approx(expected)


def test_substring_match_reads_the_first_line_case_insensitively():
    scores = compute_reward(
        "substring_match",
        texts(
            ["The answer is PARIS\nLondon", "The answer is Paris\nLondon", "  \tnothing", "x"],
            [["paris"], ["london"], ["berlin", "NOTHING"], ["y", "z"]],
        ),
    )
    # Row 1: "London" is only on the second line. Row 2: leading whitespace is stripped, any answer counts.
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("name", ["qa_f1", "substring_match"])
def test_task_rewards_name_what_is_missing(name):
    with pytest.raises(ValueError, match="rollout_texts"):
        compute_reward(name, RewardInputs(rollout_tokens=torch.zeros(2, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"reference_texts\[1\] is empty"):
        compute_reward(name, texts(["a", "b"], [["a"], []]))


def test_registration_is_idempotent_and_never_replaces_foreign_rewards():
    importlib.reload(reward.functions)
    importlib.reload(reward.functions)
    assert get_reward("qa_f1") is reward.functions.qa_f1
    assert compute_reward("qa_f1", texts(["a b"], [["b a"]])).tolist() == [1.0]

    def other(inputs: RewardInputs) -> torch.Tensor:
        return torch.zeros(inputs.num_rollouts)

    with pytest.raises(ValueError, match="already registered"):
        register_reward("qa_f1")(other)
    register_reward("test_other_reward")(other)
    try:
        with pytest.raises(ValueError, match="already registered"):
            reward.functions._register("test_other_reward", reward.functions.qa_f1)
    finally:
        unregister_reward("test_other_reward")
