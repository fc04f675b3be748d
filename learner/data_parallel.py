"""Data parallelism over several learner ranks with torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 is the learner the orchestrator talks to: it consumes the scored batches, checkpoints and
publishes weights. Each step it broadcasts the batch (the ScoredBatch and its DocumentBatch, as
codec bytes: nothing is pickled) to ranks 1..R-1. Every rank computes the GRPO advantages on the
whole batch (groups stay intact), the loss on its own contiguous slice of documents (and their
rollouts), weights each loss term by its slice's share of what the term averages
(`refine.algorithm.update.slice_loss`), and the gradients are summed across ranks before clipping. The
summed gradient is the single-rank gradient of the whole batch, also when documents differ in length;
every rank clips and steps it with an identically initialized optimizer, and the ranks' weights stay
equal. Every statistic a step reports is the whole batch's: the loss statistics are the ranks' own, weighted
by their shares and added up over the ranks (as micro-batches' are), grad_norm is that of the summed gradient.

Rendezvous: rank 0 picks a free port on its host (its Ray node address, which the other nodes can
reach); the group is formed through a TCP store there. A resumed run's ranks all load the same
checkpoint (out_dir must be on a shared file system when ranks run on different nodes), and the
parameters (and an optimizer's float32 master weights) are broadcast from rank 0 at the start anyway.

Devices: on CUDA every rank is a Ray actor holding one GPU (`num_gpus=1`, services/ray_runtime.py
`actor_options`); Ray makes only that GPU visible to it, and `learner_device` names it for torch.
"""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from torch import Tensor

from learner.update import rollouts_from_batch
from refine.algorithm.rollout import Rollouts
from refine.algorithm.update import LossResult, SliceShares, advantages_for, rollout_stats, slice_loss
from refine.config import RunConfig
from refine.models import FastWeightLM
from refine.optim import MasterWeightAdamW, clip_gradients
from refine.runtime import StageTimes
from refine.step import StepResult, backward_slices, merge_steps, mini_batch_bounds, recombine_loss
from services.codec import decode, encode
from services.messages import DocumentBatch, ScoredBatch

__all__ = ["DataParallelGroup", "cuda_ordinal", "document_slice", "free_address", "learner_device", "weights_digest"]

STOP = -1
LOOPBACK = "127.0.0.1"


def free_address() -> str:
    """`host:port` on this machine that the other ranks can reach (the port is free right now).

    Inside Ray, the node's address as Ray knows it (the one other nodes reach it by); the host name's
    address is often 127.0.0.1 / 127.0.1.1 (/etc/hosts), which a rank on another node cannot reach.
    Outside Ray every rank runs on this machine: loopback."""
    host = ray.util.get_node_ip_address() if ray.is_initialized() else LOOPBACK
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return f"{host}:{probe.getsockname()[1]}"


def cuda_ordinal(gpu_id: str, visible_devices: str | None) -> int:
    """torch's ordinal of the GPU Ray assigned (`gpu_id`, from ray.get_gpu_ids()), given the process's
    CUDA_VISIBLE_DEVICES: Ray sets it to the assigned GPUs, which torch then numbers from 0; unset
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), every GPU is visible under its own id."""
    if visible_devices is None:
        return int(gpu_id)
    visible = [device.strip() for device in visible_devices.split(",") if device.strip()]
    if gpu_id not in visible:
        raise ValueError(f"Ray assigned GPU {gpu_id!r}, but CUDA_VISIBLE_DEVICES={visible_devices!r} hides it")
    return visible.index(gpu_id)


def learner_device(configured: str) -> str:
    """The device a learner rank computes on: with `train.device` cuda and a GPU that Ray assigned to this
    actor, that GPU (made current, as NCCL expects); otherwise `configured` as it is. Without this every
    rank would use cuda:0 of all GPUs, and NCCL refuses two ranks on one device."""
    if not configured.startswith("cuda") or not ray.is_initialized():
        return configured
    gpu_ids = [str(gpu_id) for gpu_id in ray.get_gpu_ids()]
    if not gpu_ids:  # not an actor holding a GPU (the driver, a test): the configured device
        return configured
    device = f"cuda:{cuda_ordinal(gpu_ids[0], os.environ.get('CUDA_VISIBLE_DEVICES'))}"
    torch.cuda.set_device(device)
    return device


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes in order: equal digests mean bit-equal weights."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def document_slice(num_documents: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous documents [start, end) of `rank` (ranks past the batch get none)."""
    per_rank = -(-num_documents // world_size)
    start = min(rank * per_rank, num_documents)
    return start, min(start + per_rank, num_documents)


class DataParallelGroup:
    """One rank's membership of the learners' process group."""

    def __init__(self, address: str, rank: int, world_size: int, device: str, timeout_s: float) -> None:
        if world_size < 2:
            raise ValueError(f"service.num_learners={world_size}: a data-parallel group needs at least 2 ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"learner rank={rank} is outside 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def broadcast_parameters(self, model: FastWeightLM, optimizer: torch.optim.Optimizer) -> None:
        """Every rank starts from rank 0's weights, and an optimizer keeping float32 master weights from rank
        0's masters: a resumed bfloat16 run's masters hold what the rounded weights lost (rebuilding them
        from the weights would throw away every update below bfloat16's resolution)."""
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        if isinstance(optimizer, MasterWeightAdamW):
            for master in optimizer.masters:
                dist.broadcast(master.data, src=0)

    # -- the batch, rank 0 -> all -------------------------------------------------------------

    def send_batch(self, scored: ScoredBatch, documents: DocumentBatch) -> None:
        payload = [torch.frombuffer(bytearray(encode(m)), dtype=torch.uint8) for m in (scored, documents)]
        self._broadcast_header(torch.tensor([len(payload[0]), len(payload[1])], dtype=torch.long))
        dist.broadcast(torch.cat(payload).to(self.device), src=0)

    def send_stop(self) -> None:
        self._broadcast_header(torch.tensor([STOP, STOP], dtype=torch.long))

    def receive_batch(self) -> tuple[ScoredBatch, DocumentBatch] | None:
        """The next step's batch from rank 0; None when rank 0 has finished."""
        header = torch.zeros(2, dtype=torch.long)
        self._broadcast_header(header)
        if int(header[0]) == STOP:
            return None
        sizes = [int(size) for size in header]
        data = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src=0)
        raw = data.cpu().numpy().tobytes()
        return decode(raw[:sizes[0]], ScoredBatch), decode(raw[sizes[0]:], DocumentBatch)

    def _broadcast_header(self, header: torch.Tensor) -> None:
        on_device = header.to(self.device)
        dist.broadcast(on_device, src=0)
        header.copy_(on_device.cpu())

    def _whole_batch_stats(self, stats: dict[str, float], shares: list[SliceShares],
                           config: RunConfig) -> dict[str, float]:
        """This rank's loss statistics (its slices' share-weighted means) as the whole (mini-)batch's: each weighted
        by the rank's share of its term and added up over the ranks, as refine.step.merge_slice_stats merges
        micro-batches. The keys are rank 0's (it always has documents; a rank past the batch has none)."""
        keys = self._keys_of_rank_0(sorted(stats))
        share = SliceShares(sum(part.ntp for part in shares), sum(part.policy for part in shares))
        weights = [share.of_stat(key) for key in keys]
        summed = self.sum([weight * stats[key] if weight else 0.0 for key, weight in zip(keys, weights)]
                          + [share.ntp, share.policy])
        total = SliceShares(*summed[-2:])
        merged = {key: value / total.of_stat(key) if total.of_stat(key) else stats.get(key, 0.0)
                  for key, value in zip(keys, summed)}
        return recombine_loss(merged, config.refine) if merged else merged

    def _keys_of_rank_0(self, keys: list[str]) -> list[str]:
        """Rank 0's `keys`, on every rank (as UTF-8 bytes: nothing is pickled)."""
        data = "\n".join(keys).encode() if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.long)
        self._broadcast_header(size)
        if not int(size):
            return []
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0
                  else torch.empty(int(size), dtype=torch.uint8)).to(self.device)
        dist.broadcast(buffer, src=0)
        return buffer.cpu().numpy().tobytes().decode().split("\n")

    def sum(self, values: list[float]) -> list[float]:
        """`values` added up over every rank (each rank calls it with its own)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    # -- one step, on every rank --------------------------------------------------------------

    def update(self, model: FastWeightLM, optimizer: torch.optim.Optimizer, scored: ScoredBatch,
               documents: DocumentBatch, config: RunConfig, ref_model: FastWeightLM | None = None) -> StepResult:
        """Advantages on the whole batch, then per mini-batch (`train.mini_batches`): the loss on this rank's
        documents of it, summed gradients, clip, step. Every rank takes (or skips) the same steps. Stats are
        the mini-batches' means (see refine.step.rollout_batch_update)."""
        times = StageTimes(self.device)
        with times.stage("forward"):
            rollouts = rollouts_from_batch(scored, self.device)
            advantages = advantages_for(rollouts.rewards, rollouts, config.refine)
            input_ids = documents.token_ids.to(self.device, torch.long)
            lengths = documents.lengths.to(self.device, torch.long)
        outcomes = [
            self._step(model, optimizer, input_ids[start:end], lengths[start:end], rollouts.documents(start, end),
                       advantages[rollouts.rows_of(start, end)], config, ref_model, times)
            for start, end in mini_batch_bounds(input_ids.shape[0], config.train.mini_batches)
        ]
        merged = merge_steps(outcomes)
        merged.stats.update(rollout_stats(rollouts), **times.stats(), data_parallel_ranks=self.world_size)
        return merged

    def _step(self, model: FastWeightLM, optimizer: torch.optim.Optimizer, input_ids: Tensor, lengths: Tensor,
              rollouts: Rollouts, advantages: Tensor, config: RunConfig, ref_model: FastWeightLM | None,
              times: StageTimes) -> StepResult:
        """One optimizer step on a (mini-)batch: this rank's slice of its documents (forward and backward in
        `train.micro_batches` parts of it), gradients summed over ranks."""
        stats: dict[str, float] = {}
        shares: list[SliceShares] = []
        local_finite = True
        start, end = document_slice(input_ids.shape[0], self.rank, self.world_size)
        optimizer.zero_grad(set_to_none=True)
        if end > start:
            def loss_of(a: int, b: int) -> tuple[LossResult, SliceShares]:
                result, share = slice_loss("onepass", model, input_ids, lengths, rollouts, advantages, config.refine,
                                           a, b, ref_model)
                shares.append(share)
                return result, share

            parts = [(start + a, start + b) for a, b in mini_batch_bounds(end - start, config.train.micro_batches)]
            stats, local_finite = backward_slices(parts, loss_of, config.refine, times)
            if not local_finite:
                optimizer.zero_grad(set_to_none=True)  # this rank adds nothing; the flag skips every rank's step
        stats = self._whole_batch_stats(stats, shares, config)
        with times.stage("backward_step"):
            for parameter in model.parameters():
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            flag = torch.tensor([0.0 if local_finite else 1.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.SUM)
            grad_norm = clip_gradients(model.parameters(), config.optim.grad_clip)
            stats["grad_norm"] = float(grad_norm)
            skipped = float(flag) > 0 or not torch.isfinite(grad_norm)
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                stats["skipped_nonfinite"] = 1.0
            else:
                optimizer.step()
        return StepResult(stats, skipped)
