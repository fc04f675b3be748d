import math
import sys
import uuid

import pytest
import torch
import torch.nn.functional as F

from refine.algorithm.rewards import (
    RewardInputs,
    available_rewards,
    binary_reward,
    check_run_reward,
    compute_reward,
    cosine_reward,
    get_reward,
    hybrid_reward,
    import_reward_modules,
    register_reward,
    reward_reads_text,
    unregister_reward,
)
from refine.algorithm.rollout import Rollouts
from refine.algorithm.update import score_rollouts
from refine.config import RefineConfig

# Two rollouts, k = 2 steps, D = 2.
ROLLOUT_HIDDEN = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [-2.0, 0.0]]])
TRUTH_HIDDEN = torch.tensor([[[5.0, 0.0], [1.0, 1.0]], [[-1.0, 0.0], [-1.0, 0.0]]])
# Row 0: cos = 1 and 1/sqrt(2) -> mean (1 + 0.70711) / 2 = 0.85355. Row 1: -1 and 1 -> 0.
COSINE = [(1 + 1 / math.sqrt(2)) / 2, 0.0]
ROLLOUT_TOKENS = torch.tensor([[4, 7], [1, 1]])
TRUTH_TOKENS = torch.tensor([[4, 8], [1, 1]])
# Row 0: 1 of 2 match -> 0.5. Row 1: both -> 1.0.
BINARY = [0.5, 1.0]


def inputs() -> RewardInputs:
    return RewardInputs(
        rollout_tokens=ROLLOUT_TOKENS,
        ground_truth_tokens=TRUTH_TOKENS,
        rollout_hidden=ROLLOUT_HIDDEN,
        ground_truth_hidden=TRUTH_HIDDEN,
    )


def test_cosine_binary_hybrid_on_hand_made_vectors():
    assert cosine_reward(ROLLOUT_HIDDEN, TRUTH_HIDDEN).tolist() == pytest.approx(COSINE)
    assert binary_reward(ROLLOUT_TOKENS, TRUTH_TOKENS).tolist() == pytest.approx(BINARY)
    hybrid = hybrid_reward(ROLLOUT_TOKENS, TRUTH_TOKENS, ROLLOUT_HIDDEN, TRUTH_HIDDEN)
    assert hybrid.tolist() == pytest.approx([c + b for c, b in zip(COSINE, BINARY)])


def test_cosine_is_scale_invariant_and_keeps_float64():
    scaled = cosine_reward(ROLLOUT_HIDDEN.double() * 7.5, TRUTH_HIDDEN.double() * 0.1)
    assert scaled.dtype == torch.float64
    assert scaled.tolist() == pytest.approx(COSINE, abs=1e-12)


@pytest.mark.parametrize("dtype,expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32)])
def test_training_scores_rollouts_in_their_own_precision_at_least_float32(dtype, expected):
    # A float64 run (the paths' correctness oracle) keeps float64 rewards; half precision is scored in float32.
    hidden = torch.randn(4, 3, 8, dtype=torch.float64)
    target = hidden + 1e-9 * torch.randn_like(hidden)  # a difference float32 cannot hold
    rollouts = Rollouts(torch.tensor([[5, 9]]), torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3),
                        hidden.to(dtype), torch.zeros(4, 3, dtype=torch.long), target.to(dtype), torch.zeros(1, 2), 2)
    rewards = score_rollouts(rollouts, RefineConfig(reward="cosine"))
    assert rewards.dtype == expected
    assert torch.equal(rewards, cosine_reward(hidden.to(dtype).to(expected), target.to(dtype).to(expected)))


def test_cosine_of_huge_finite_vectors_does_not_overflow_to_zero():
    # Squaring 1e200 (float64) or 1e20 (float32) overflows the norm; the cosine used to come out 0.
    huge = torch.tensor([[[1e200, 1e200]]], dtype=torch.float64)
    assert cosine_reward(huge, huge).tolist() == pytest.approx([1.0], abs=1e-12)
    assert cosine_reward(huge, -huge).tolist() == pytest.approx([-1.0], abs=1e-12)
    big = torch.full((2, 3, 8), 1e20)
    assert cosine_reward(big, big).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    largest = torch.full((1, 1, 4), torch.finfo(torch.float32).max)
    assert cosine_reward(largest, largest.neg()).tolist() == pytest.approx([-1.0], abs=1e-6)
    tiny = torch.tensor([[[1e-40, 3e-41]]])  # subnormal: scaled in two factors, the cosine still exact
    assert cosine_reward(tiny, tiny).tolist() == pytest.approx([1.0], abs=1e-6)
    # Far below the cosine's eps even after 2**1023: [1e-320, 0] was 9e-5 against [1, 0].
    tiniest = torch.tensor([[[1e-320, 0.0]], [[3e-320, 4e-320]]], dtype=torch.float64)
    unit = torch.tensor([[[1.0, 0.0]], [[4.0, 3.0]]], dtype=torch.float64)
    assert cosine_reward(tiniest, unit).tolist() == pytest.approx([1.0, 0.96], abs=1e-3)
    zero = torch.zeros(1, 1, 4)
    assert cosine_reward(zero, torch.ones(1, 1, 4)).tolist() == [0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_values_and_gradients_match_torch_on_ordinary_vectors(dtype: torch.dtype):
    """The rescaling is by powers of two: on vectors torch handles, values and gradients are bit-identical."""
    generator = torch.Generator().manual_seed(0)
    rollout = (torch.randn(16, 4, 64, generator=generator) * 3).to(dtype).requires_grad_(True)
    truth = (torch.randn(16, 4, 64, generator=generator) * 1e-3).to(dtype).requires_grad_(True)
    ours = cosine_reward(rollout, truth)
    reference = F.cosine_similarity(rollout, truth, dim=-1, eps=1e-8).mean(dim=-1)
    assert torch.equal(ours, reference)
    ours_grads = torch.autograd.grad(ours.sum(), (rollout, truth))
    reference_grads = torch.autograd.grad(reference.sum(), (rollout, truth))
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, reference_grads))


def test_registry_serves_the_builtin_rewards():
    assert {"cosine", "binary", "hybrid", "cosine_similarity"} <= set(available_rewards())
    assert compute_reward("cosine", inputs()).tolist() == pytest.approx(COSINE)
    assert compute_reward("cosine_similarity", inputs()).tolist() == pytest.approx(COSINE)
    assert compute_reward("binary", inputs()).tolist() == pytest.approx(BINARY)
    assert get_reward("hybrid")(inputs()).tolist() == pytest.approx([c + b for c, b in zip(COSINE, BINARY)])


def test_a_task_reward_plugs_in_and_reads_texts():
    @register_reward("test_exact_answer")
    def exact_answer(batch: RewardInputs) -> torch.Tensor:
        batch.require("rollout_texts", "reference_texts")
        hits = [float(text.strip() in refs) for text, refs in zip(batch.rollout_texts, batch.reference_texts)]
        return torch.tensor(hits)

    try:
        batch = RewardInputs(rollout_texts=["Paris ", "Rome"], reference_texts=[["Paris"], ["Milan", "Turin"]])
        assert compute_reward("test_exact_answer", batch).tolist() == [1.0, 0.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_exact_answer")(lambda batch: torch.zeros(batch.num_rollouts))
    finally:
        unregister_reward("test_exact_answer")
    assert "test_exact_answer" not in available_rewards()


def test_unknown_reward_and_missing_fields_are_named():
    with pytest.raises(ValueError, match="unknown reward 'f1x'"):
        get_reward("f1x")
    with pytest.raises(ValueError, match="rollout_hidden"):
        compute_reward("cosine", RewardInputs(rollout_tokens=ROLLOUT_TOKENS, ground_truth_tokens=TRUTH_TOKENS))


def test_reward_output_is_checked():
    @register_reward("test_bad_shape")
    def bad_shape(batch: RewardInputs) -> torch.Tensor:
        return torch.zeros(batch.num_rollouts + 1)

    @register_reward("test_nan")
    def nan(batch: RewardInputs) -> torch.Tensor:
        return torch.full((batch.num_rollouts,), float("nan"))

    try:
        with pytest.raises(ValueError, match=r"shape \[2\]"):
            compute_reward("test_bad_shape", inputs())
        with pytest.raises(ValueError, match="NaN or Inf"):
            compute_reward("test_nan", inputs())
    finally:
        unregister_reward("test_bad_shape")
        unregister_reward("test_nan")


def test_non_finite_and_inconsistent_inputs_are_rejected():
    bad = ROLLOUT_HIDDEN.clone()
    bad[1, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="rollout_hidden contains NaN or Inf"):
        cosine_reward(bad, TRUTH_HIDDEN)
    with pytest.raises(ValueError, match="rollout_hidden contains NaN or Inf"):
        RewardInputs(rollout_hidden=bad, ground_truth_hidden=TRUTH_HIDDEN)
    with pytest.raises(ValueError, match="same shape"):
        cosine_reward(ROLLOUT_HIDDEN, TRUTH_HIDDEN[:, :1])
    with pytest.raises(ValueError, match="same number of rollouts"):
        RewardInputs(rollout_tokens=ROLLOUT_TOKENS, rollout_texts=["only one"])
    with pytest.raises(ValueError, match="integer token ids"):
        binary_reward(ROLLOUT_TOKENS.float(), TRUTH_TOKENS)


# ------------------------------------------------------------------------------ plugging rewards in


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A scratch module on sys.path that registers one reward when imported: (module, reward) names."""
    module, reward = f"scratch_rewards_{uuid.uuid4().hex[:8]}", f"test_plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "import torch\n"
        "from refine.algorithm.rewards import register_reward\n\n\n"
        f"@register_reward({reward!r}, reads_text=True)\n"
        "def reward(inputs):\n"
        "    inputs.require('rollout_texts')\n"
        "    return torch.tensor([float(len(text)) for text in inputs.rollout_texts])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module, reward
    unregister_reward(reward)
    sys.modules.pop(module, None)


def test_reward_modules_are_imported_and_register_their_rewards(reward_module, tmp_path, monkeypatch):
    module, reward = reward_module
    assert reward not in available_rewards()
    import_reward_modules([module])
    import_reward_modules([module])  # a second import is harmless
    assert reward in available_rewards() and reward_reads_text(reward)
    assert compute_reward(reward, RewardInputs(rollout_texts=["ab", ""])).tolist() == [2.0, 0.0]
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.delitem(sys.modules, "broken_rewards", raising=False)
    for name, why in [("no_such_rewards_module", "ModuleNotFoundError"), ("broken_rewards", "no GPU here")]:
        with pytest.raises(ValueError, match=f"refine.reward_modules: cannot import '{name}': .*{why}"):
            import_reward_modules([name])


def test_the_registry_knows_which_rewards_read_text():
    import reward.functions  # noqa: F401  (the task rewards)

    assert not any(reward_reads_text(name) for name in ("cosine", "cosine_similarity", "binary", "hybrid"))
    assert reward_reads_text("qa_f1") and reward_reads_text("substring_match")
    with pytest.raises(ValueError, match="unknown reward 'f1x'"):
        reward_reads_text("f1x")


def test_registration_refuses_what_every_consumer_would_refuse():
    with pytest.raises(ValueError, match="at most 128 characters, got 129"):
        register_reward("x" * 129)
    with pytest.raises(ValueError, match="'test_none' must be a callable .* got NoneType"):
        register_reward("test_none")(None)
    with pytest.raises(ValueError, match="reads_text of reward 'test_flag' must be a bool"):
        register_reward("test_flag", reads_text="yes")
    assert "test_none" not in available_rewards()
    name = "x" * 128  # the limit itself is fine
    register_reward(name)(lambda batch: torch.zeros(batch.num_rollouts))
    unregister_reward(name)


def test_the_run_check_names_the_field_and_where_text_is_scored(reward_module):
    module, reward = reward_module
    with pytest.raises(ValueError, match=r"refine.reward='nope' is not a registered reward; registered: \[.*'cosine'"):
        check_run_reward("nope", decodes_text=True)
    for name in ("qa_f1", "substring_match"):
        with pytest.raises(ValueError, match=f"refine.reward='{name}' scores decoded text, which only the reward "
                                             f"replicas of service.mode='disaggregated' produce"):
            check_run_reward(name, decodes_text=False)
        check_run_reward(name, decodes_text=True)
    check_run_reward("cosine_similarity", decodes_text=False)
    # A custom reward is known once its module, named in refine.reward_modules, is imported.
    with pytest.raises(ValueError, match="is not a registered reward"):
        check_run_reward(reward, decodes_text=True)
    check_run_reward(reward, [module], decodes_text=True)
    with pytest.raises(ValueError, match="scores decoded text"):
        check_run_reward(reward, [module], decodes_text=False)


def test_a_library_step_imports_its_configs_reward_modules_and_takes_bool_scores(tmp_path, monkeypatch):
    """score_rollouts (every training step) looked the reward up without importing refine.reward_modules, which
    only the commands imported ("unknown reward"); a reward returning a bool per rollout passed the output check
    and failed later in the stats' mean()."""
    module, reward = f"scratch_rewards_{uuid.uuid4().hex[:8]}", f"test_match_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from refine.algorithm.rewards import register_reward\n\n\n"
        f"@register_reward({reward!r})\n"
        "def reward(inputs):\n"
        "    return inputs.rollout_tokens[:, 0] == inputs.ground_truth_tokens[:, 0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    hidden = torch.randn(4, 3, 8)
    rollouts = Rollouts(torch.tensor([[5, 9]]), torch.tensor([[1, 2, 3], [4, 5, 6], [1, 0, 0], [7, 7, 7]]),
                        torch.zeros(4, 3), hidden, torch.tensor([[1, 2, 3]] * 4), hidden, torch.zeros(1, 2), 2)
    try:
        rewards = score_rollouts(rollouts, RefineConfig(reward=reward, reward_modules=[module]))
    finally:
        unregister_reward(reward)
        sys.modules.pop(module, None)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
