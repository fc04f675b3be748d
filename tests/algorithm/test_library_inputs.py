"""The library's entry points refuse input they cannot honor, by name, before any work: rollout positions,
rollouts made for another batch, token ids the model does not have, a KL term without a reference policy."""

import pytest
import torch

from refine.algorithm.rollout import reprefill_rollouts, snapshot_rollouts
from refine.algorithm.update import advantages_for, fused_refine_step, refine_loss, score_rollouts
from refine.config import RefineConfig
from refine.generate import generate
from refine.models import build_model

CFG = RefineConfig(num_chunks=2, rollout_len=3, margin=4, num_samples=2)
VOCAB = 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                            vocab_size=VOCAB, intermediate_size=32), dtype=torch.float64)


def _batch():
    ids = torch.randint(1, VOCAB, (2, 60), generator=torch.Generator().manual_seed(1))
    ids[1, 40:] = 0  # padding
    return ids, torch.tensor([60, 40])


def test_fused_step_checks_given_positions_as_the_rollout_paths_do(model):
    ids, lengths = _batch()
    for positions, message in (
        (torch.tensor([[20, 30], [0, 10]]), r"positions\[1, 0\]=0 is outside 1..37"),  # read the row's last logits
        (torch.tensor([[20, 30], [10, 38]]), r"positions\[1, 1\]=38 is outside 1..37"),  # ground truth in padding
        (torch.tensor([[20.0, 30.0], [10.0, 20.0]]), "positions must be an integer tensor, got dtype torch.float32"),
    ):
        for call in (lambda: fused_refine_step(model, ids, lengths, CFG, torch.Generator(), positions=positions),
                     lambda: snapshot_rollouts(model, ids, lengths, CFG, torch.Generator(), positions=positions),
                     lambda: reprefill_rollouts(model, ids, lengths, CFG, positions, torch.Generator())):
            with pytest.raises(ValueError, match=message):
                call()


@pytest.mark.parametrize("mode", ["onepass", "reference"])
def test_both_loss_paths_refuse_rollouts_made_for_other_documents(model, mode):
    ids, lengths = _batch()
    rollouts = snapshot_rollouts(model, ids, lengths, CFG, torch.Generator().manual_seed(2),
                                 positions=torch.tensor([[20, 50], [10, 30]]))
    rollouts.rewards = score_rollouts(rollouts, CFG)
    advantages = advantages_for(rollouts.rewards, rollouts, CFG)
    three = torch.cat([ids, ids[:1]])
    with pytest.raises(ValueError, match=r"rollouts were made for 2 documents .* but the batch holds 3"):
        refine_loss(mode, model, three, torch.tensor([60, 40, 60]), rollouts, advantages, CFG)
    shorter = torch.tensor([40, 40])  # the first document cut: its rollout at 50 would read past its end
    with pytest.raises(ValueError, match=r"positions\[0, 1\]=50 is outside 1..37"):
        refine_loss(mode, model, ids, shorter, rollouts, advantages, CFG)
    assert torch.isfinite(refine_loss(mode, model, ids, lengths, rollouts, advantages, CFG).loss)


def test_a_kl_term_without_a_reference_policy_is_refused(model):
    ids, lengths = _batch()
    cfg = CFG.model_copy(update={"kl_coef": 0.5})
    with pytest.raises(ValueError, match=r"refine.kl_coef=0.5 needs ref_model"):
        fused_refine_step(model, ids, lengths, cfg, torch.Generator().manual_seed(0))
    rollouts = snapshot_rollouts(model, ids, lengths, cfg, torch.Generator().manual_seed(0))
    rollouts.rewards = score_rollouts(rollouts, cfg)
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)
    with pytest.raises(ValueError, match=r"refine.kl_coef=0.5 needs ref_model"):
        refine_loss("onepass", model, ids, lengths, rollouts, advantages, cfg)
    result = refine_loss("onepass", model, ids, lengths, rollouts, advantages, cfg, ref_model=model)
    assert "pg/kl_loss" in result.stats  # given one, the term is there


def test_token_ids_the_model_does_not_have_are_named(model):
    ids, lengths = _batch()
    for bad, value in (((1, 50), VOCAB), ((0, 3), -1)):  # padding is embedded too: (1, 50) lies past length 40
        wrong = ids.clone()
        wrong[bad] = value
        message = (rf"input_ids\[{bad[0]}, {bad[1]}\]={value} is not a token id of the model \(vocab_size={VOCAB}: "
                   rf"ids 0..{VOCAB - 1}\)")
        with pytest.raises(ValueError, match=message):
            fused_refine_step(model, wrong, lengths, CFG, torch.Generator())
        with pytest.raises(ValueError, match=message):
            snapshot_rollouts(model, wrong, lengths, CFG, torch.Generator())
        with pytest.raises(ValueError, match=message.replace("input_ids", "prompt_ids")):
            generate(model, wrong, 2, lengths=lengths)
    wrong = ids.clone()
    wrong[0, 7] = wrong[1, 2] = VOCAB + 3  # the first of several is named
    with pytest.raises(ValueError, match=rf"input_ids\[0, 7\]={VOCAB + 3} is not a token id"):
        fused_refine_step(model, wrong, lengths, CFG, torch.Generator())


def test_batches_without_tokens_and_one_dimensional_ids_are_named(model):
    with pytest.raises(ValueError, match=r"input_ids holds no tokens: shape \(0, 60\)"):
        fused_refine_step(model, torch.zeros(0, 60, dtype=torch.long), torch.zeros(0, dtype=torch.long), CFG)
    with pytest.raises(ValueError, match=r"input_ids holds no tokens: shape \(0, 60\)"):
        snapshot_rollouts(model, torch.zeros(0, 60, dtype=torch.long), torch.zeros(0, dtype=torch.long), CFG)
    with pytest.raises(ValueError, match=r"input_ids holds no tokens: shape \(2, 0\)"):
        snapshot_rollouts(model, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long), CFG)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, time\], got shape \(60,\)"):
        model(torch.ones(60, dtype=torch.long))


def test_advantages_of_unscored_rollouts_say_to_score_them(model):
    ids, lengths = _batch()
    rollouts = snapshot_rollouts(model, ids, lengths, CFG, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"rewards is None: score the rollouts first"):
        advantages_for(rollouts.rewards, rollouts, CFG)


def test_boolean_lengths_group_ids_and_token_ids_are_not_read_as_integers(model):
    """A bool tensor converts to 0s and 1s without a word: generate would cut the prompt to one token."""
    from refine.algorithm.advantages import grpo_advantages
    from refine.algorithm.losses import ntp_loss
    from refine.algorithm.rewards import binary_reward
    from refine.algorithm.selection import select_positions

    ids, _ = _batch()
    flags = torch.tensor([True, True])
    with pytest.raises(ValueError, match=r"lengths must be 2 integers in \[1, 60\]"):
        generate(model, ids, 2, lengths=flags)
    with pytest.raises(ValueError, match=r"lengths must be integers in \[0, 60\] of shape \[2\]"):
        ntp_loss(torch.zeros(2, 60, VOCAB), ids, flags)
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \[2\]"):
        select_positions(torch.rand(2, 60), flags, num_chunks=2, rollout_len=3)
    with pytest.raises(ValueError, match="group_ids must be an integer tensor of shape"):
        grpo_advantages(torch.rand(4), torch.tensor([True, True, False, False]))
    with pytest.raises(ValueError, match="rollout_tokens must hold integer token ids, got dtype torch.bool"):
        binary_reward(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.long))
