"""Slices of a batch's documents whose weighted losses add up to the whole batch's loss and gradient
(refine.algorithm.update.slice_loss): what data-parallel ranks and micro-batches (gradient accumulation) sum."""

from __future__ import annotations

import pytest
import torch

from refine.algorithm.rollout import choose_positions, reprefill_rollouts, snapshot_rollouts
from refine.algorithm.update import advantages_for, refine_loss, score_rollouts, slice_loss
from refine.config import RefineConfig
from refine.models import build_model


def _batch(cfg: RefineConfig, lengths: list[int], mode: str = "onepass", layers: int = 2):
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=40, hidden_size=32, num_hidden_layers=layers,
                             num_heads=2, use_short_conv=True), dtype=torch.float64)
    lens = torch.tensor(lengths)
    ids = torch.randint(0, 40, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(1))
    if mode == "onepass":
        rollouts = snapshot_rollouts(model, ids, lens, cfg, torch.Generator().manual_seed(2))
    else:
        with torch.no_grad():
            document = model(ids, lengths=lens, output_state=False)
            positions = choose_positions(document.logits, lens, cfg, torch.Generator().manual_seed(2))
        rollouts = reprefill_rollouts(model, ids, lens, cfg, positions, torch.Generator().manual_seed(3),
                                      document_hidden=document.hidden_states)
    rollouts.rewards = score_rollouts(rollouts, cfg)
    return model, ids, lens, rollouts, advantages_for(rollouts.rewards, rollouts, cfg)


def _gradient(model, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.mark.parametrize("mode", ["onepass", "reference"])
@pytest.mark.parametrize("partition", [[(0, 1), (1, 3)], [(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)]])
def test_slice_gradients_sum_to_the_whole_batch_gradient_with_unequal_lengths(mode, partition) -> None:
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=2, lambda_nsp=0.7, kl_coef=0.0)
    model, ids, lengths, rollouts, advantages = _batch(cfg, [150, 60, 110], mode)
    whole = _gradient(model, refine_loss(mode, model, ids, lengths, rollouts, advantages, cfg).loss)
    summed = sum(_gradient(model, slice_loss(mode, model, ids, lengths, rollouts, advantages, cfg, start, end,
                                             )[0].loss) for start, end in partition)
    # float64 rounding only: a slice scaled by its token share alone would be off by masked_mean's 1e-8
    # over the batch's tokens, 2e-10 of the gradient's norm.
    assert float((summed - whole).norm() / whole.norm()) < 1e-13


def test_the_ntp_term_is_weighted_by_the_slices_targets_not_its_documents() -> None:
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=2, lambda_nsp=0.7, kl_coef=0.0)
    model, ids, lengths, rollouts, advantages = _batch(cfg, [150, 60, 110])
    part, shares = slice_loss("onepass", model, ids, lengths, rollouts, advantages, cfg, 0, 2)
    assert shares.ntp == (149 + 59) / 317 and shares.policy == pytest.approx(2 / 3, rel=1e-9)
    exact = _gradient(model, slice_loss("onepass", model, ids, lengths, rollouts, advantages, cfg, 0, 2)[0].loss)
    by_documents = part.loss + cfg.lambda_ntp * part.ntp_loss * (2 / 3 - (149 + 59) / 317)
    assert not torch.allclose(_gradient(model, by_documents), exact, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-sum", "seq-mean-token-mean"])
def test_seq_mean_slices_also_sum_to_the_whole_batch_loss_and_gradient(loss_agg: str) -> None:
    """Without the gradient check, a seq-mean slice weighted by its share of the rollouts instead of its share
    of the documents would pass: on-policy each document's policy term is -mean(A) over its own groups, 0, so
    only the loss's gradient, not its value, sees the policy weight."""
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=2, lambda_nsp=0.7, kl_coef=0.0, loss_agg=loss_agg)
    model, ids, lengths, rollouts, advantages = _batch(cfg, [90, 40, 70], layers=1)
    losses = [slice_loss("onepass", model, ids, lengths, rollouts, advantages, cfg, start, end)[0].loss
              for start, end in [(0, 2), (2, 3)]]
    whole = refine_loss("onepass", model, ids, lengths, rollouts, advantages, cfg).loss
    assert abs((sum(losses) - whole).item()) <= 1e-14 * abs(whole.item())
    summed, exact = sum(_gradient(model, loss) for loss in losses), _gradient(model, whole)
    assert float((summed - exact).norm() / exact.norm()) < 1e-13
