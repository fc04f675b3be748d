"""Two real gloo ranks (torch.distributed, one process each) against the single-process update: the
summed gradient is the whole batch's, and a resumed bfloat16 run keeps its float32 master weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from learner.data_parallel import DataParallelGroup, free_address
from learner.update import rollouts_from_batch
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import score_rollouts
from refine.config import RunConfig
from refine.models import build_model
from refine.optim import MasterWeightAdamW
from refine.step import rollout_batch_update
from services.messages import DocumentBatch, ScoredBatch

MODEL = dict(model_type="delta_net", vocab_size=40, hidden_size=32, num_hidden_layers=1, num_heads=2)
TIMEOUT_S = 120.0


def _run_ranks(target, *args) -> None:
    """`target(rank, address, *args)` on 2 spawned processes; raises when either fails."""
    mp.start_processes(target, args=(free_address(), *args), nprocs=2, join=True, start_method="spawn")


# -- the summed gradient ------------------------------------------------------------------------------------------

def _config() -> RunConfig:
    config = RunConfig()
    config.refine.num_chunks, config.refine.rollout_len, config.refine.num_samples = 2, 3, 2
    config.refine.margin, config.refine.lambda_nsp, config.refine.kl_coef = 4, 0.7, 0.0
    config.train.batch_size = 3
    config.optim.grad_clip = 1e6  # no clipping: the gradients are compared as computed
    return config


def _batch(model: torch.nn.Module, config: RunConfig) -> tuple[ScoredBatch, DocumentBatch]:
    lengths = torch.tensor([70, 40, 55])  # unequal: the slices' shares differ
    ids = torch.randint(0, 40, (3, 70), generator=torch.Generator().manual_seed(5))
    rollouts = snapshot_rollouts(model, ids, lengths, config.refine, torch.Generator().manual_seed(10))
    rewards = score_rollouts(rollouts, config.refine)
    documents = DocumentBatch(doc_ids=["a", "b", "c"], token_ids=ids, lengths=lengths)
    scored = ScoredBatch(document_batch_id=documents.batch_id, policy_version=0, worker_id="w",
                         num_samples=rollouts.num_samples, rollout_len=rollouts.rollout_len,
                         positions=rollouts.positions, entropies=rollouts.entropies, rollout_tokens=rollouts.tokens,
                         behaviour_logprobs=rollouts.logprobs, rewards=rewards, reward_type="cosine")
    return scored, documents


def _gradient(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([parameter.grad.flatten() for parameter in model.parameters()])


def _gradient_rank(rank: int, address: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(MODEL, dtype=torch.float64)
    config = _config()
    scored, documents = _batch(model, config)
    single = copy.deepcopy(model)
    group = DataParallelGroup(address, rank, 2, "cpu", timeout_s=TIMEOUT_S)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        group.broadcast_parameters(model, optimizer)
        stats = group.update(model, optimizer, scored, documents, config).stats
    finally:
        group.close()
    torch.save({key: value for key, value in stats.items() if not key.endswith("_seconds")}, f"{out}.stats{rank}")
    if rank == 0:
        optimizer = torch.optim.AdamW(single.parameters(), lr=1e-2)
        single_stats = rollout_batch_update("onepass", single, optimizer, documents.token_ids.long(),
                                            documents.lengths.long(), rollouts_from_batch(scored), config).stats
        torch.save({"ranks": _gradient(model), "single": _gradient(single),
                    "single_stats": {key: value for key, value in single_stats.items()
                                     if not key.endswith("_seconds")}}, out)


def test_two_gloo_ranks_sum_to_the_single_process_gradient_under_token_mean(tmp_path: Path) -> None:
    out = tmp_path / "gradients.pt"
    _run_ranks(_gradient_rank, str(out))
    gradients = torch.load(out, weights_only=True)
    ranks, single = gradients["ranks"], gradients["single"]
    assert ranks.dtype == torch.float64
    # float64 rounding only; slices weighted by their plain token share were 2e-10 off (masked_mean's 1e-8).
    assert float((ranks - single).norm() / single.norm()) < 1e-14
    # Every statistic is the whole batch's on every rank (the loss statistics were rank 0's slice alone).
    single_stats = gradients["single_stats"]
    for rank in (0, 1):
        stats = torch.load(f"{out}.stats{rank}", weights_only=True)
        stats.pop("data_parallel_ranks")
        assert set(stats) ^ set(single_stats) == set() and "pg/clip_fraction" in stats, set(stats) ^ set(single_stats)
        for key, value in single_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


# -- a resumed bfloat16 run's master weights ----------------------------------------------------------------------

def _bf16_model_and_optimizer() -> tuple[torch.nn.Module, MasterWeightAdamW]:
    torch.manual_seed(0)
    model = build_model(MODEL, dtype=torch.bfloat16)
    return model, MasterWeightAdamW(model.parameters(), lr=1e-6, weight_decay=0.01)


def _resume_rank(rank: int, address: str, checkpoint: str, out: str) -> None:
    torch.set_num_threads(1)
    model, optimizer = _bf16_model_and_optimizer()
    if rank == 0:  # rank 0 loads the checkpoint; rank 1's masters must become rank 0's all the same
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    group = DataParallelGroup(address, rank, 2, "cpu", timeout_s=TIMEOUT_S)
    try:
        group.broadcast_parameters(model, optimizer)
    finally:
        group.close()
    torch.save({"masters": [master.detach() for master in optimizer.masters], "model": model.state_dict()},
               f"{out}.{rank}")


def test_a_resumed_bfloat16_run_keeps_the_checkpoints_float32_master_weights(tmp_path: Path) -> None:
    model, optimizer = _bf16_model_and_optimizer()
    for _ in range(20):  # lr 1e-6: the masters move below bfloat16's resolution, the weights do not
        for parameter in model.parameters():
            parameter.grad = torch.ones_like(parameter)
        optimizer.step()
    saved = [master.detach().clone() for master in optimizer.masters]
    assert any(not torch.equal(master, parameter.float()) for master, parameter in zip(saved, model.parameters()))
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)

    out = tmp_path / "rank"
    _run_ranks(_resume_rank, str(checkpoint), str(out))
    for rank in range(2):
        after = torch.load(f"{out}.{rank}", weights_only=True)
        assert all(torch.equal(master, kept) for master, kept in zip(after["masters"], saved)), rank
        assert all(torch.equal(after["model"][name], value) for name, value in model.state_dict().items()), rank
