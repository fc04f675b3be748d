"""Data parallelism's arithmetic (learner/data_parallel.py): document slices and loss weights whose
gradients sum to the whole batch's. Two gloo ranks are in test_data_parallel_ranks.py; the 2-rank service run
in tests/integration/test_service_data_parallel.py."""

from __future__ import annotations

import pytest
import ray
import torch

from learner.data_parallel import cuda_ordinal, document_slice, free_address, slice_loss
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
        # float64 rounding only: a slice scaled by its token share alone would be off by masked_mean's 1e-8
        # over the batch's tokens, 2e-10 of the gradient's norm.
        assert float((summed - whole).norm() / whole.norm()) < 1e-14, ranks
    # Weighting the NTP term by the slice's share of documents, not of targets, would be caught.
    start, end = document_slice(3, 0, 2)
    exact = gradient(slice_loss(model, ids, lengths, rollouts, advantages, cfg, start, end).loss)
    part = slice_loss(model, ids, lengths, rollouts, advantages, cfg, start, end)
    by_documents = part.loss + cfg.lambda_ntp * part.ntp_loss * ((end - start) / 3 - (149 + 59) / 317)
    assert not torch.allclose(gradient(by_documents), exact, rtol=1e-6, atol=1e-9)


def test_seq_mean_slices_also_sum_to_the_whole_batch_gradient() -> None:
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=40, hidden_size=32, num_hidden_layers=1, num_heads=2),
                        dtype=torch.float64)
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=2, lambda_nsp=0.7, kl_coef=0.0,
                       loss_agg="seq-mean-token-sum")
    lengths = torch.tensor([90, 40, 70])
    ids = torch.randint(0, 40, (3, 90), generator=torch.Generator().manual_seed(1))
    rollouts = snapshot_rollouts(model, ids, lengths, cfg, torch.Generator().manual_seed(2))
    rollouts.rewards = score_rollouts(rollouts, cfg)
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)
    losses = [slice_loss(model, ids, lengths, rollouts, advantages, cfg, *document_slice(3, rank, 2)).loss
              for rank in range(2)]
    whole = refine_loss("onepass", model, ids, lengths, rollouts, advantages, cfg).loss
    assert abs((sum(losses) - whole).item()) <= 1e-14 * abs(whole.item())


def test_the_rank_0_address_outside_ray_is_loopback(monkeypatch) -> None:
    # The host name's address is not what other nodes reach; outside Ray every rank is on this machine.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # an earlier test may have left Ray running
    host, _, port = free_address().rpartition(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536


def test_the_gpu_ray_assigned_is_numbered_within_the_visible_devices() -> None:
    assert cuda_ordinal("3", "3") == 0  # Ray's default: only the actor's GPU is visible, as cuda:0
    assert cuda_ordinal("5", "4,5") == 1
    assert cuda_ordinal("2", None) == 2  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: every GPU visible
    with pytest.raises(ValueError, match="Ray assigned GPU '1', but CUDA_VISIBLE_DEVICES='0,2' hides it"):
        cuda_ordinal("1", "0,2")
