"""One training step's optimizer updates: the NTP or REFINE loss of a batch (whole, in mini-batches or in
micro-batches), backward, gradient clipping and the optimizer step, a non-finite one skipped; and the count of
skipped steps in a row that says a run has diverged.

Used by the single-process loop (refine.loop), post-training's phases and the service's learner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from refine.algorithm.losses import ntp_loss
from refine.algorithm.rollout import Rollouts, choose_positions, reprefill_rollouts, snapshot_rollouts
from refine.algorithm.update import (
    LossResult, SliceShares, advantages_for, fused_refine_step, refine_loss, rollout_stats, score_rollouts,
    slice_loss, target_share,
)
from refine.config import DTYPES, OptimConfig, RefineConfig, RunConfig
from refine.data.batches import DocumentBatch
from refine.errors import NonFiniteOutputError, check_argument_type
from refine.models import FastWeightLM
from refine.optim import MasterWeightAdamW, clip_gradients, describe_rates, has_low_precision_weights, learning_rate
from refine.runtime import StageTimes, timed_stage


@dataclass
class StepResult:
    stats: dict[str, float]
    skipped: bool


def make_optimizer(model: FastWeightLM, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over every parameter, weight decay included, as the paper's code (verl's FSDP workers) builds it;
    with float32 master weights when the model's are bfloat16 or float16 (see refine.optim)."""
    options = dict(lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas)
    if has_low_precision_weights(model):
        return MasterWeightAdamW(model.parameters(), **options)
    return torch.optim.AdamW(model.parameters(), **options)


def check_gradients_on(model: FastWeightLM, caller: str) -> None:
    """Refuse gradient steps that autograd could not take (its own error names no cause): under torch.no_grad()
    or torch.inference_mode(), or on a model none of whose parameters requires grad."""
    if not torch.is_grad_enabled():
        raise ValueError(f"{caller} takes gradient steps, but gradients are off: torch.no_grad() or "
                         f"torch.inference_mode() is active")
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError(f"{caller} takes gradient steps, but no parameter of the model requires grad")


def train_step(model: FastWeightLM, optimizer: torch.optim.Optimizer, batch: DocumentBatch, config: RunConfig,
               generator: torch.Generator, ref_model: FastWeightLM | None = None,
               times: StageTimes | None = None) -> StepResult:
    """One step of the configured mode on a document batch: its optimizer step, or for onepass/reference one
    per mini-batch (`train.mini_batches`). `times` collects seconds per stage (forward; the fused step's own
    stages; rollout, before the update forwards of onepass/reference; backward_step)."""
    check_argument_type(config, RunConfig, "config")
    check_mini_batches(config)
    check_gradients_on(model, "train_step")
    mode, cfg = config.train.mode, config.refine
    ids, lengths = batch.input_ids, batch.lengths
    if mode in ("onepass", "reference"):
        with timed_stage(times, "rollout"):
            try:
                if mode == "onepass":
                    rollouts = snapshot_rollouts(model, ids, lengths, cfg, generator)
                else:
                    with torch.no_grad():  # one pass gives the entropies and the ground truth's hidden states
                        document = model(ids, lengths=lengths, output_state=False)
                        positions = choose_positions(document.logits, lengths, cfg, generator)
                    rollouts = reprefill_rollouts(model, ids, lengths, cfg, positions, generator,
                                                  document_hidden=document.hidden_states)
            except NonFiniteOutputError:
                return skipped_for_logits()
            rollouts.rewards = score_rollouts(rollouts, cfg)
        return rollout_batch_update(mode, model, optimizer, ids, lengths, rollouts, config, ref_model, times)
    if mode == "fused":
        return fused_step(model, optimizer, ids, lengths, cfg, config.optim.grad_clip, generator, ref_model, times)
    # ntp: train.mini_batches optimizer steps on runs of the batch's documents, as REFINE's mini-batches take
    # them, so that a comparison gives both the same number of updates.
    outcomes = []
    for start, end in mini_batch_bounds(ids.shape[0], config.train.mini_batches):
        mini_ids, mini_lengths = ids[start:end], lengths[start:end]
        if config.train.micro_batches > 1:
            def loss_of(a: int, b: int) -> tuple[LossResult, SliceShares]:
                return ntp_slice_loss(model, mini_ids, mini_lengths, a, b)

            outcomes.append(micro_batch_step(model, optimizer, end - start, config.train.micro_batches, loss_of,
                                             config, times))
            continue
        with timed_stage(times, "forward"):
            result, _ = ntp_slice_loss(model, mini_ids, mini_lengths, 0, end - start)
        with timed_stage(times, "backward_step"):
            outcomes.append(optimizer_step(model, optimizer, result, config.optim.grad_clip))
    return merge_steps(outcomes)


def fused_step(model: FastWeightLM, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor, lengths: torch.Tensor,
               cfg: RefineConfig, grad_clip: float, generator: torch.Generator | None = None,
               ref_model: FastWeightLM | None = None, times: StageTimes | None = None) -> StepResult:
    """The fused on-policy step (refine.algorithm.update.fused_refine_step), then backward, clip and the optimizer
    step; skipped when its loss, gradient or logits are not finite."""
    try:
        result, _ = fused_refine_step(model, input_ids, lengths, cfg, generator, ref_model, times=times)
    except NonFiniteOutputError:
        return skipped_for_logits()
    with timed_stage(times, "backward_step"):
        return optimizer_step(model, optimizer, result, grad_clip)


def skipped_for_logits() -> StepResult:
    """A step skipped because the model's logits held NaN or Inf where it selects positions or samples rollouts
    (NonFiniteOutputError): counted as a non-finite loss is, as the NTP loss over those logits would be."""
    return StepResult({"skipped_nonfinite": 1.0, "nonfinite_logits": 1.0}, True)


def ntp_slice_loss(model: FastWeightLM, input_ids: torch.Tensor, lengths: torch.Tensor, start: int,
                   end: int) -> tuple[LossResult, SliceShares]:
    """The NTP loss of documents [start, end) of a batch, weighted by their share of its next-token targets (the
    whole batch: weight 1); its stats are the slice's own mean."""
    ntp = ntp_loss(model(input_ids[start:end], lengths=lengths[start:end], output_state=False).logits,
                   input_ids[start:end], lengths[start:end])
    share = target_share(lengths, start, end)
    weighted = ntp if share == 1 else share * ntp
    stats = {"ntp_loss": float(ntp.detach()), "loss": float(ntp.detach())}
    return LossResult(weighted, ntp, ntp.new_zeros(()), stats), SliceShares(ntp=share, policy=0.0)


def check_mini_batches(config: RunConfig) -> None:
    """train_step's fused mode takes one optimizer step per batch, from one forward: refuse mini-batches and
    micro-batches it would ignore."""
    if config.train.mini_batches > 1 and config.train.mode == "fused":
        raise ValueError(f"train.mini_batches={config.train.mini_batches} needs train.mode 'onepass' or 'reference', "
                         f"which sample rollouts once per step (or 'ntp'); train.mode='fused' samples them in every "
                         f"update (on-policy): lower train.batch_size instead")
    if config.train.micro_batches > 1 and config.train.mode == "fused":
        raise ValueError(f"train.micro_batches={config.train.micro_batches} needs train.mode 'onepass', 'reference' or "
                         f"'ntp': train.mode='fused' samples its rollouts from the forward it trains, one per step; "
                         f"train.mode=onepass takes the same on-policy update with micro-batches")


def mini_batch_bounds(num_documents: int, mini_batches: int) -> list[tuple[int, int]]:
    """[start, end) of `mini_batches` contiguous runs of documents covering the batch, sizes differing by at most
    one; a batch of fewer documents (a finite source's last, partial batch) gets one run per document."""
    if num_documents < 1 or mini_batches < 1:
        raise ValueError(f"cannot split {num_documents} documents into train.mini_batches={mini_batches}")
    count = min(mini_batches, num_documents)
    cuts = [round(i * num_documents / count) for i in range(count + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def rollout_batch_update(mode: str, model: FastWeightLM, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                         lengths: torch.Tensor, rollouts: Rollouts, config: RunConfig,
                         ref_model: FastWeightLM | None = None, times: StageTimes | None = None) -> StepResult:
    """Train on a batch of scored rollouts: GRPO advantages over the whole batch (its groups never span two
    documents), then an optimizer step per mini-batch of documents with the `mode` loss ("onepass" or
    "reference"). From the second mini-batch on, the policy has moved since the rollouts were sampled: the
    ratio differs from 1 and the clip acts, as in the paper's code. Stats are the mini-batches' means;
    skipped: any mini-batch's step was skipped."""
    cfg = config.refine
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)
    outcomes = []
    for start, end in mini_batch_bounds(input_ids.shape[0], config.train.mini_batches):
        ids, lens, mini = input_ids[start:end], lengths[start:end], rollouts.documents(start, end)
        mini_advantages = advantages[rollouts.rows_of(start, end)]
        if config.train.micro_batches > 1:
            def loss_of(a: int, b: int) -> tuple[LossResult, SliceShares]:
                return slice_loss(mode, model, ids, lens, mini, mini_advantages, cfg, a, b, ref_model)

            outcomes.append(micro_batch_step(model, optimizer, end - start, config.train.micro_batches, loss_of,
                                             config, times))
            continue
        with timed_stage(times, "forward"):
            result = refine_loss(mode, model, ids, lens, mini, mini_advantages, cfg, ref_model)
        with timed_stage(times, "backward_step"):
            outcomes.append(optimizer_step(model, optimizer, result, config.optim.grad_clip))
    merged = merge_steps(outcomes)
    merged.stats.update(rollout_stats(rollouts))
    return merged


def merge_steps(outcomes: list[StepResult]) -> StepResult:
    """The optimizer steps of one batch reported as one: each stat's mean over the steps that report it (a
    skipped step has no grad_norm), skipped_nonfinite the fraction of steps skipped; skipped when any step was."""
    if len(outcomes) == 1:
        return outcomes[0]
    keys = dict.fromkeys(key for outcome in outcomes for key in outcome.stats)
    stats = {}
    for key in keys:
        values = [outcome.stats[key] for outcome in outcomes if key in outcome.stats]
        stats[key] = sum(values) / (len(outcomes) if key == "skipped_nonfinite" else len(values))
    return StepResult(stats, any(outcome.skipped for outcome in outcomes))


# This many steps in a row with every optimizer step skipped (non-finite loss or gradient) end a run: its weights
# have diverged, and further steps only burn compute.
MAX_SKIPPED_IN_A_ROW = 10


class Divergence:
    """Counts steps in a row whose every optimizer step was skipped as not finite; says when a run has diverged, or
    when a run ended without any step taken."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.in_a_row = 0

    def add(self, step: int, stats: dict) -> ValueError | None:
        """Record step `step`'s stats; after MAX_SKIPPED_IN_A_ROW fully skipped steps in a row, the error that ends
        the run (returned: the caller raises it where its own bookkeeping is done), else None."""
        self.in_a_row = self.in_a_row + 1 if stats.get("skipped_nonfinite", 0.0) >= 1.0 else 0
        # A run shorter than that whose every step was skipped ends with the error too, not as a success whose
        # weights never moved.
        if self.in_a_row < MAX_SKIPPED_IN_A_ROW and not self.in_a_row == step == self.config.train.steps:
            return None
        if step == self.in_a_row:  # no step ever taken: the weights are the run's start, no learning rate moved them
            cfg, dtype = self.config.refine, DTYPES[self.config.train.dtype]
            weights = ("" if self.config.train.mode == "ntp" else
                       f"the loss weights (refine.lambda_ntp={cfg.lambda_ntp:g}, lambda_nsp={cfg.lambda_nsp:g}, "
                       f"kl_coef={cfg.kl_coef:g}: train.dtype={self.config.train.dtype} holds at most "
                       f"{torch.finfo(dtype).max:.3g}) or ")
            return ValueError(
                f"steps 1..{step} were all skipped for a non-finite loss or gradient, from the first: the loss is not "
                f"finite at the weights the run started from, so check {weights}the starting weights ("
                f"{f'train.init_from={self.config.train.init_from!r}' if self.config.train.init_from else 'a new model'}"
                f"); the run stops")
        return ValueError(
            f"steps {step - self.in_a_row + 1}..{step} were all skipped for a non-finite loss or gradient: the "
            f"weights have diverged (learning rate {learning_rate(self.config.optim, step, self.config.train.steps):g}"
            f" at step {step}, {describe_rates(self.config.optim)}; optim.grad_clip={self.config.optim.grad_clip}, "
            f"train.dtype={self.config.train.dtype}); the run stops")


def optimizer_step(model: FastWeightLM, optimizer: torch.optim.Optimizer, result: LossResult,
                   grad_clip: float) -> StepResult:
    """Backward, clip, step; a step whose loss or gradient is not finite is skipped (and reported)."""
    optimizer.zero_grad(set_to_none=True)
    stats = dict(result.stats)
    if not torch.isfinite(result.loss):
        return StepResult(stats | {"skipped_nonfinite": 1.0}, True)
    result.loss.backward()
    return clip_and_step(model, optimizer, stats, grad_clip)


def clip_and_step(model: FastWeightLM, optimizer: torch.optim.Optimizer, stats: dict[str, float],
                  grad_clip: float) -> StepResult:
    """Clip the gradients in .grad and step; a non-finite gradient skips the step (and is reported)."""
    grad_norm = clip_gradients(model.parameters(), grad_clip)
    stats = stats | {"grad_norm": float(grad_norm)}
    if not math.isfinite(stats["grad_norm"]):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(stats | {"skipped_nonfinite": 1.0}, True)
    optimizer.step()
    return StepResult(stats, False)


SliceLoss = Callable[[int, int], tuple[LossResult, SliceShares]]  # documents [start, end) -> weighted loss, shares


def backward_slices(slices: list[tuple[int, int]], loss_of: SliceLoss, cfg: RefineConfig,
                    times: StageTimes | None = None) -> tuple[dict[str, float], bool]:
    """Forward and backward each slice of documents in turn, their gradients adding up in .grad: with slice losses
    weighted by their shares (slice_loss), the sum is the gradient of all the slices' documents as one batch, with
    one slice's activations in memory at a time. Returns the slices' stats merged (merge_slice_stats) and whether
    every loss was finite. After a non-finite one (the step is to be skipped) the other slices only run forward,
    without gradient, so that the skipped step reports the whole batch's stats as an undivided one does."""
    parts: list[tuple[dict[str, float], SliceShares]] = []
    finite = True
    for start, end in slices:
        with timed_stage(times, "forward"), torch.set_grad_enabled(finite):
            result, shares = loss_of(start, end)
        parts.append((result.stats, shares))
        finite = finite and bool(torch.isfinite(result.loss))
        if finite:
            with timed_stage(times, "backward_step"):
                result.loss.backward()
    return merge_slice_stats(parts, cfg), finite


def merge_slice_stats(parts: list[tuple[dict[str, float], SliceShares]], cfg: RefineConfig) -> dict[str, float]:
    """The stats of slices of documents as those of the slices together: each a share-weighted mean
    (SliceShares.of_stat), and loss recombined from them as the loss is."""
    if len(parts) == 1:
        return dict(parts[0][0])
    merged: dict[str, float] = {}
    for key in dict.fromkeys(key for stats, _ in parts for key in stats):
        weighted = [(shares.of_stat(key), stats[key]) for stats, shares in parts if key in stats]
        total = sum(weight for weight, _ in weighted)
        merged[key] = sum(weight * value for weight, value in weighted) / total if total else weighted[0][1]
    return recombine_loss(merged, cfg)


def recombine_loss(merged: dict[str, float], cfg: RefineConfig) -> dict[str, float]:
    """`merged` with its loss made from its merged terms, as the loss is (a mean of the losses would weight
    each by the wrong share)."""
    if "policy_loss" in merged:
        merged["loss"] = cfg.lambda_ntp * merged["ntp_loss"] + cfg.lambda_nsp * merged["policy_loss"]
    else:  # ntp mode: the loss is the NTP loss
        merged["loss"] = merged["ntp_loss"]
    return merged


def micro_batch_step(model: FastWeightLM, optimizer: torch.optim.Optimizer, num_documents: int, micro_batches: int,
                     loss_of: SliceLoss, config: RunConfig, times: StageTimes | None = None) -> StepResult:
    """One optimizer step on `num_documents` documents, run forward and backward in `micro_batches` slices
    (`train.micro_batches`, gradient accumulation): the update of the whole batch to rounding, in less memory."""
    optimizer.zero_grad(set_to_none=True)
    stats, finite = backward_slices(mini_batch_bounds(num_documents, micro_batches), loss_of, config.refine, times)
    with timed_stage(times, "backward_step"):
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            return StepResult(stats | {"skipped_nonfinite": 1.0}, True)
        return clip_and_step(model, optimizer, stats, config.optim.grad_clip)
