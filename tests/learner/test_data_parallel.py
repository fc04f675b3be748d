"""Data parallelism's arithmetic (learner/data_parallel.py): document slices and loss weights whose
gradients sum to the whole batch's. The 2-rank run itself is in tests/integration/test_service_data_parallel.py."""

from __future__ import annotations

import torch

from learner.data_parallel import document_slice, slice_loss
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import advantages_for, refine_loss, score_rollouts
from refine.config import RefineConfig
from refine.models import build_model


def test_documents_are_split_into_contiguous_slices_covering_the_batch() -> None:
    for documents in range(0, 7):
        for ranks in range(2, 5):
            slices = [document_slice(documents, rank, ranks) for rank in range(ranks)]
            covered = [i for start, end in slices for i in range(start, end)]
            assert covered == list(range(documents)), (documents, ranks)


def test_slice_gradients_sum_to_the_whole_batch_gradient_with_unequal_lengths() -> None:
    # What the ranks' summed gradient is: the sum of the slices' gradients (all_reduce SUM).
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=2,
                             use_short_conv=True), dtype=torch.float64)
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=2, lambda_nsp=0.7, kl_coef=0.0)
    lengths = torch.tensor([150, 60, 110])
    ids = torch.randint(0, 40, (3, 150), generator=torch.Generator().manual_seed(1))
    rollouts = snapshot_rollouts(model, ids, lengths, cfg, torch.Generator().manual_seed(2))
    rollouts.rewards = score_rollouts(rollouts, cfg)
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return torch.cat([g.flatten() for g in grads])

    whole = gradient(refine_loss("onepass", model, ids, lengths, rollouts, advantages, cfg).loss)
    for ranks in (2, 3):
        slices = [document_slice(3, rank, ranks) for rank in range(ranks)]
        summed = sum(gradient(slice_loss(model, ids, lengths, rollouts, advantages, cfg, start, end).loss)
                     for start, end in slices)
        # float64; the policy gradient sums terms whose advantages cancel, so its rounding shows at ~1e-10.
        torch.testing.assert_close(summed, whole, rtol=1e-6, atol=1e-9)
    # Weighting the NTP term by the slice's share of documents, not of targets, would be caught.
    start, end = document_slice(3, 0, 2)
    exact = gradient(slice_loss(model, ids, lengths, rollouts, advantages, cfg, start, end).loss)
    part = slice_loss(model, ids, lengths, rollouts, advantages, cfg, start, end)
    by_documents = part.loss + cfg.lambda_ntp * part.ntp_loss * ((end - start) / 3 - (149 + 59) / 317)
    assert not torch.allclose(gradient(by_documents), exact, rtol=1e-6, atol=1e-9)
