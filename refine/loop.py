"""The single-process training loop: NTP or REFINE (one-pass, fused or reference) over a document source.

Used from notebooks, by `refine train --local`, and as the baseline the distributed service is
measured against. A run directory gets config.yaml, metrics.jsonl, checkpoints/ and PNG curves.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from refine.algorithm.losses import ntp_loss
from refine.algorithm.rewards import check_run_reward
from refine.algorithm.rollout import (
    Rollouts, batch_generator, choose_positions, reprefill_rollouts, snapshot_rollouts,
)
from refine.algorithm.update import (
    LossResult, SliceShares, advantages_for, fused_refine_step, refine_loss, rollout_stats, score_rollouts,
    slice_loss, target_share,
)
from refine.config import (
    DTYPES, OptimConfig, RefineConfig, RunConfig, dump_config, fit_to_tokenizer, input_path_fields, run_tokenizer,
)
from refine.data.batches import DocumentBatch
from refine.data.sources import DataSourceError
from refine.data.stream import DataPosition, check_resumed_cursor, check_source, document_batches, shuffled_pass_span
from refine.evaluation.heldout import heldout_evaluator
from refine.files import file_system_error, sync_directory, sync_tree, write_atomically
from refine.models import FastWeightLM, build_model, load_model, load_model_config, save_model
from refine.models.size import check_model_fits
from refine.optim import (
    MasterWeightAdamW, clip_gradients, describe_rates, has_low_precision_weights, learning_rate, set_learning_rate,
)
from refine.plots import plot_metrics
from refine.runtime import StageTimes, timed_stage, tune_allocator
from refine.tokenizer import Tokenizer, same_tokenizer, save_tokenizer_files, tokenizer_name


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


def train_step(model: FastWeightLM, optimizer: torch.optim.Optimizer, batch: DocumentBatch, config: RunConfig,
               generator: torch.Generator, ref_model: FastWeightLM | None = None,
               times: StageTimes | None = None) -> StepResult:
    """One step of the configured mode on a document batch: its optimizer step, or for onepass/reference one
    per mini-batch (`train.mini_batches`). `times` collects seconds per stage (forward; the fused step's own
    stages; rollout, before the update forwards of onepass/reference; backward_step)."""
    check_mini_batches(config)
    mode, cfg = config.train.mode, config.refine
    ids, lengths = batch.input_ids, batch.lengths
    if mode in ("onepass", "reference"):
        with timed_stage(times, "rollout"):
            if mode == "onepass":
                rollouts = snapshot_rollouts(model, ids, lengths, cfg, generator)
            else:
                with torch.no_grad():  # one pass gives the entropies and the ground truth's hidden states
                    document = model(ids, lengths=lengths, output_state=False)
                    positions = choose_positions(document.logits, lengths, cfg, generator)
                rollouts = reprefill_rollouts(model, ids, lengths, cfg, positions, generator,
                                              document_hidden=document.hidden_states)
            rollouts.rewards = score_rollouts(rollouts, cfg)
        return rollout_batch_update(mode, model, optimizer, ids, lengths, rollouts, config, ref_model, times)
    if mode == "fused":
        result, _ = fused_refine_step(model, ids, lengths, cfg, generator, ref_model, times=times)
        with timed_stage(times, "backward_step"):
            return optimizer_step(model, optimizer, result, config.optim.grad_clip)
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
    """Counts steps in a row whose every optimizer step was skipped as not finite; says when a run has diverged."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.in_a_row = 0

    def add(self, step: int, stats: dict) -> ValueError | None:
        """Record step `step`'s stats; after MAX_SKIPPED_IN_A_ROW fully skipped steps in a row, the error that ends
        the run (returned: the caller raises it where its own bookkeeping is done), else None."""
        self.in_a_row = self.in_a_row + 1 if stats.get("skipped_nonfinite", 0.0) >= 1.0 else 0
        if self.in_a_row < MAX_SKIPPED_IN_A_ROW:
            return None
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


# The programs that write run directories: `refine train` (local or service; "refine" in messages) counts
# documents of data.source, `refine posttrain` examples of its task file. Each writes the record named here into
# its run directory; a fresh run removes the others' (clear_checkpoints).
RUN_RECORDS = {"refine": "data_source.json", "refine posttrain": "posttrain.json"}
PROGRAM_FILE = "program.json"  # in each checkpoint: {"program": the RUN_RECORDS key of the run that wrote it}


@dataclass
class RunPosition:
    """Where a run stands: the steps taken (a step is one batch and one metrics.jsonl row: `train.mini_batches`
    optimizer steps for `refine train`, those of the REFINE update plus one SFT step for `refine posttrain`),
    the data cursor after them, how many of those steps were skipped for a non-finite loss or gradient, and the
    program whose run it is (a RUN_RECORDS key, saved in each checkpoint so that another program's --resume
    refuses it; the service's learner leaves the default)."""

    step: int = 0
    cursor: int = 0
    skipped_steps: int = 0
    program: str = "refine"
    epoch: int = 0  # the data stream's passes through the last batch (DataPosition), which seed its rollouts


def save_checkpoint(path: Path, model: FastWeightLM, optimizer: torch.optim.Optimizer, position: RunPosition,
                    generator: torch.Generator, tokenizer: Tokenizer) -> None:
    """Model directory (fla-loadable, with the tokenizer's files so that `refine eval --model` reads text as
    training did) + trainer state (optimizer, RNG, data cursor, skipped steps) for exact resume + the program
    that wrote it (PROGRAM_FILE), written into directory `path` (see `save_run_checkpoint` for a run's
    checkpoints/latest, which also puts them on disk)."""
    if position.program not in RUN_RECORDS:
        raise ValueError(f"program={position.program!r} is not one of {sorted(RUN_RECORDS)}")
    save_model(model, path / "model")
    save_tokenizer_files(tokenizer, path / "model")
    # Through a Python file: torch writing to a path reports a full disk as "unexpected pos"; writing to a file
    # object, the OSError is kept in its error's context (see refine.files.file_system_error).
    with open(path / "trainer.pt", "wb") as handle:
        torch.save({
            "step": position.step, "cursor": position.cursor, "skipped_steps": position.skipped_steps,
            "epoch": position.epoch, "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }, handle)
    (path / PROGRAM_FILE).write_text(json.dumps({"program": position.program, "step": position.step}))


def checkpoint_program(path: Path) -> str | None:
    """The program that wrote checkpoint directory `path` (its PROGRAM_FILE); None for a checkpoint written
    before checkpoints said so. A damaged file fails naming it."""
    file = path / PROGRAM_FILE
    if not file.exists():
        return None
    try:
        program = json.loads(file.read_text()).get("program")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{file}: not readable ({type(error).__name__}: {error})") from None
    if program not in RUN_RECORDS:
        raise ValueError(f"{file}: program={program!r} is not one of {sorted(RUN_RECORDS)}")
    return program


def checkpoint_step(path: Path) -> int:
    """The step at which checkpoint directory `path` was written (its PROGRAM_FILE, else its trainer state)."""
    file = path / PROGRAM_FILE
    if file.exists():
        try:
            return int(json.loads(file.read_text())["step"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # an older checkpoint's file, without the step: the trainer state has it
    return int(read_trainer_state(path / "trainer.pt")["step"])


def latest_checkpoint(out_dir: str | Path) -> Path:
    """`checkpoints/latest` of a run directory, or `checkpoints/previous` if the run died between the two renames
    of a swap (the path returned may not exist: no checkpoint yet)."""
    latest = Path(out_dir) / "checkpoints" / "latest"
    previous = latest.with_name("previous")
    return previous if not latest.exists() and previous.exists() else latest


def save_run_checkpoint(out_dir: str | Path, model: FastWeightLM, optimizer: torch.optim.Optimizer,
                        position: RunPosition, generator: torch.Generator, tokenizer: Tokenizer,
                        extra_files: dict[str, str] | None = None, keep: int = 0) -> Path:
    """The run's checkpoints/latest, whole or not at all: written into a fresh directory (with `extra_files`,
    name -> text), then swapped in, so a run killed while writing keeps its previous checkpoint (a torn one
    would resume new weights with an old optimizer, step and data cursor). Durable across a machine crash too:
    every file and directory written is fsynced before the swap, and checkpoints/ after it, before the
    previous checkpoint is removed. A write that fails removes what it wrote (on a full disk, a partial
    checkpoint as large as a whole one would keep even a --resume from starting); one the file system refused
    (a full disk, a file too large) is one OSError naming the checkpoint, the cause and the checkpoint kept.
    `keep` > 0 (train.keep_checkpoints) then keeps this checkpoint as checkpoints/step-NNNNNNNN too, and the
    newest `keep` of those (see keep_step_checkpoint)."""
    latest = Path(out_dir) / "checkpoints" / "latest"
    created = not latest.parent.exists()
    _remove_partial_checkpoints(latest.parent)
    if keep:  # a run killed (or refused by the disk) between its last swap and keeping that step keeps it now
        _keep_latest_if_missing(latest, position.program, keep)
    staging = latest.with_name(f"step-{position.step:08d}.partial")
    with _staged(staging, lambda reason: f"cannot save the step-{position.step} checkpoint in {latest.parent} "
                                         f"({reason}): its partial files are removed; "
                                         f"{kept_checkpoint(out_dir, position.program)}"):
        staging.mkdir(parents=True)
        save_checkpoint(staging, model, optimizer, position, generator, tokenizer)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        sync_tree(staging)
    previous = latest.with_name("previous")
    if latest.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(latest, previous)
    os.replace(staging, latest)
    sync_directory(latest.parent)  # the renames on disk: only then may the previous checkpoint go
    if created:
        sync_directory(latest.parent.parent)
    shutil.rmtree(previous, ignore_errors=True)
    if keep:
        keep_step_checkpoint(latest, position, keep)
    return latest


KEPT_NAME = re.compile(r"step-(\d{8,})")  # checkpoints/step-NNNNNNNN: a kept checkpoint (keep_step_checkpoint)


@contextmanager
def _staged(staging: Path, failure: Callable[[str], str]) -> Iterator[None]:
    """A checkpoint written into folder `staging`: a failure removes what it staged, and a write the file system
    refused (a full disk, a file too large) becomes one OSError, `failure(the refusal's reason)`."""
    try:
        yield
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        cause = file_system_error(error)
        if cause is None:
            raise
        raise OSError(failure(_reason(cause))) from None


def step_checkpoints(folder: Path) -> list[Path]:
    """The kept checkpoints (checkpoints/step-NNNNNNNN) of a run's checkpoints folder, oldest step first; other
    folders (a user's copy named step-best, say) are not the run's to prune."""
    kept = [(int(match.group(1)), path) for path in folder.glob("step-*")
            if (match := KEPT_NAME.fullmatch(path.name)) and path.is_dir()]
    return [path for _, path in sorted(kept)]


def _remove_whole(folder: Path) -> None:
    """Remove a checkpoint folder so that a kill partway leaves no half of it under its name: renamed to a
    .partial name first, which the next save removes (_remove_partial_checkpoints)."""
    if not folder.exists():
        return
    doomed = folder.with_name(f"{folder.name}.removed.partial")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _keep_latest_if_missing(latest: Path, program: str, keep: int) -> None:
    """checkpoints/latest kept as its step's folder when it has none (its step from PROGRAM_FILE; checkpoints
    written before it said their step are left as they are)."""
    try:
        step = json.loads((latest / PROGRAM_FILE).read_text()).get("step")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return
    if isinstance(step, int) and not isinstance(step, bool) and step > 0 \
            and not latest.with_name(f"step-{step:08d}").exists():
        keep_step_checkpoint(latest, RunPosition(step=step, program=program), keep)


def keep_step_checkpoint(latest: Path, position: RunPosition, keep: int) -> None:
    """checkpoints/latest (just written, at `position.step`) kept as checkpoints/step-NNNNNNNN, its files hard
    links (copies where the file system has none; staged and renamed, so whole or not at all), then the older
    kept checkpoints past the newest `keep` removed. A write the disk refuses is an OSError naming it, as for
    latest; latest stays intact."""
    kept = latest.with_name(f"step-{position.step:08d}")
    staging = kept.with_name(f"{kept.name}.partial")
    with _staged(staging, lambda reason: f"cannot keep the step-{position.step} checkpoint as {kept} ({reason}): "
                                         f"{latest} is intact: `{_command(position.program)} --resume` continues "
                                         f"from it"):
        _remove_whole(kept)  # a resumed run's step again: the newer checkpoint replaces it
        for file in sorted(latest.rglob("*")):  # not copytree: it gathers errors into one unreadable shutil.Error
            target = staging / file.relative_to(latest)
            if file.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(str(file), str(target))
        sync_tree(staging)
        os.replace(staging, kept)
        sync_directory(kept.parent)
    for old in step_checkpoints(latest.parent)[:-keep]:
        _remove_whole(old)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # no hard links on this file system (or across devices): a copy
        shutil.copy2(source, destination)


def kept_checkpoint(out_dir: str | Path, program: str) -> str:
    """What a run stopped by a failed write can resume from, for the end of its error message."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint.exists():
        return f"the earlier checkpoint {checkpoint} is intact: `{_command(program)} --resume` continues from it"
    return f"the run has no earlier checkpoint: `{_command(program)}` starts it over"


def _reason(error: OSError) -> str:
    """An OSError's cause, with the file it names: "No space left on device", "File too large: '/x'"."""
    if error.strerror is None:
        return str(error)
    return error.strerror if error.filename is None else f"{error.strerror}: {str(error.filename)!r}"


def clear_checkpoints(out_dir: str | Path, program: str = "refine") -> bool:
    """Remove an earlier run's checkpoint from a run directory that a fresh run of `program` (a RUN_RECORDS key;
    the service's `refine train` by default) starts over, as it starts metrics.jsonl over: else a `--resume`
    after the fresh run died before its first checkpoint would continue the earlier run's weights. The other
    programs' run records go too (the fresh run writes its own): the directory then says whose run it holds.
    Returns whether there was a checkpoint."""
    folder = Path(out_dir) / "checkpoints"
    found = [path for path in (folder / "latest", folder / "previous") if path.exists()] + step_checkpoints(folder)
    for path in found:
        shutil.rmtree(path)
    _remove_partial_checkpoints(folder)
    for other, record in RUN_RECORDS.items():
        if other != program:
            (Path(out_dir) / record).unlink(missing_ok=True)
    return bool(found)


def fresh_run_message(out_dir: Path, cleared: bool) -> str | None:
    """What a fresh run in `out_dir` says about the earlier run's files: its checkpoints removed (`cleared`),
    and its eval results (eval-*.json, which score its checkpoints) left where they are, named."""
    results = sorted(path.name for path in Path(out_dir).glob("eval-*.json"))
    if not cleared and not results:
        return None
    parts = ["removed the earlier run's checkpoints (--resume continues a run)"] if cleared else []
    if results:
        shown = ", ".join(results[:5]) + (f" and {len(results) - 5} more" if len(results) > 5 else "")
        parts.append(f"the earlier run's eval results stay ({shown}): they score its checkpoints, not this run's")
    return f"a fresh run in {out_dir}: " + "; ".join(parts)


def _remove_partial_checkpoints(folder: Path) -> None:
    """Remove the half-written checkpoints (`step-*.partial`) that runs killed while saving left behind: each
    is as large as a checkpoint and none is ever read."""
    for path in folder.glob("step-*.partial"):
        shutil.rmtree(path, ignore_errors=True)


TRAINER_KEYS = ("step", "cursor", "optimizer", "generator", "torch_rng")  # skipped_steps: absent in older ones


def read_trainer_state(path: Path) -> dict:
    """trainer.pt's contents, read with weights_only=True (tensors and numbers only: no code runs). Any failure
    is one ValueError naming the file: torch's own message would advise weights_only=False, which is unsafe."""
    try:
        trainer = torch.load(path, weights_only=True)
    except Exception as error:  # torch.load fails in many ways (UnpicklingError, EOFError, RuntimeError, OSError)
        raise ValueError(f"{path}: not a readable training checkpoint ({_load_failure(error)})") from None
    if not isinstance(trainer, dict) or not all(key in trainer for key in TRAINER_KEYS):
        raise ValueError(f"{path}: not a readable training checkpoint (it needs the entries {', '.join(TRAINER_KEYS)})")
    return trainer


def _load_failure(error: Exception) -> str:
    """The reason of a torch.load failure in one line, without torch's advice to load unsafely."""
    text = str(error)
    if "WeightsUnpickler error:" in text:  # the actual reason sits between torch's advice and its doc link
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:  # EOFError says nothing
        return "the file is empty or cut short" if isinstance(error, EOFError) else type(error).__name__
    return lines[0].split(". ")[0]  # torch's first sentence; the rest is advice


def check_same_model(model_dir: Path, model: FastWeightLM) -> None:
    """A checkpoint resumes only into the model it was saved from; name every field that differs."""
    saved, current = load_model_config(model_dir), model.config
    if saved.model_type != current.model_type:
        fields = ["model_type"]
    else:  # declared fields only: extras are library bookkeeping (architectures, transformers_version)
        fields = [name for name in type(current).model_fields if getattr(saved, name) != getattr(current, name)]
    if fields:
        differences = "; ".join(f"model.{name}={getattr(saved, name)!r} in the checkpoint, "
                                f"{getattr(current, name)!r} in this config" for name in fields)
        raise ValueError(f"checkpoint {model_dir.parent} was saved from another model ({differences}): resume with "
                         f"the run's own config.yaml, or start a new run in another train.out_dir")


def load_checkpoint(path: Path, model: FastWeightLM, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> RunPosition:
    """Weights, optimizer state and RNGs of checkpoint directory `path`. The optimizer keeps the settings it was
    made with (the run config's lr, betas, weight decay): a resume with other settings trains with those, as
    its config.yaml says; the moments and step counts come from the checkpoint."""
    check_same_model(path / "model", model)
    trainer = read_trainer_state(path / "trainer.pt")
    model.load_state_dict(load_model(path / "model").state_dict())
    configured = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(trainer["optimizer"])
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    generator.set_state(trainer["generator"])
    torch.set_rng_state(trainer["torch_rng"])
    return RunPosition(int(trainer["step"]), int(trainer["cursor"]), int(trainer.get("skipped_steps", 0)),
                       epoch=int(trainer.get("epoch", 0)))


def resume_from(out_dir: Path, resume: bool, model: FastWeightLM, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, program: str, tokenizer: Tokenizer) -> RunPosition:
    """Where to start: the checkpoint's position when resuming from one, else the start; either is `program`'s.
    `tokenizer`, the run's, must be the one the checkpoint was trained with."""
    checkpoint = latest_checkpoint(out_dir)
    if resume and checkpoint.exists():
        check_resumed_program(out_dir, program)
        check_resumed_tokenizer(out_dir, tokenizer)
        return replace(load_checkpoint(checkpoint, model, optimizer, generator), program=program)
    if resume:
        check_kept_without_latest(out_dir)
        tqdm.write(f"{program}: no checkpoint at {checkpoint} to resume from: starting at step 0", file=sys.stderr)
    return RunPosition(program=program)


def check_kept_without_latest(out_dir: str | Path) -> None:
    """Refuse a --resume that finds no checkpoints/latest but kept checkpoints (latest moved or deleted): it would
    start over as a fresh run, which removes them."""
    kept = step_checkpoints(Path(out_dir) / "checkpoints")
    if kept:
        raise ValueError(f"--resume: {latest_checkpoint(out_dir)} does not exist, but the kept checkpoints "
                         f"{', '.join(path.name for path in kept[-3:])} do; a run starting over would remove them: "
                         f"to continue from one, rename it to {Path(out_dir) / 'checkpoints' / 'latest'}")


def check_resumed_tokenizer(out_dir: str | Path, tokenizer: Tokenizer) -> None:
    """Refuse a --resume whose tokenizer is not the one saved with the latest checkpoint's model (its file rewritten
    since, or another `tokenizer` given): the model's token ids would change meaning in the middle of the run."""
    model_dir = latest_checkpoint(out_dir) / "model"
    if not model_dir.is_dir() or same_tokenizer(tokenizer, model_dir):
        return
    saved = (f"the tokenizer saved there (--set tokenizer={model_dir})" if (model_dir / "tokenizer.json").exists()
             else "the byte-level tokenizer (--set tokenizer=byte)")
    raise ValueError(f"--resume: tokenizer {tokenizer_name(tokenizer)!r} is not the one checkpoint {model_dir.parent} "
                     f"was trained with: resume with {saved}, or start a new run from the checkpoint "
                     f"(train.init_from={model_dir}) to change tokenizers")


def _command(program: str) -> str:
    return "refine train" if program == "refine" else program


def check_resumed_program(out_dir: Path, program: str) -> None:
    """Refuse a --resume of another program's run: its checkpoint's data cursor counts other records (documents
    against task examples), and the resumed run would splice its rows into the other's metrics.jsonl. The latest
    checkpoint says which program wrote it (PROGRAM_FILE); only one written before checkpoints said so is judged
    by the run records in the directory, and refused when they do not name `program` alone."""
    checkpoint = latest_checkpoint(out_dir)
    if not checkpoint.exists():
        return
    refusal = (f"`{_command(program)} --resume` continues only runs of `{_command(program)}` (the checkpoint's "
               f"data cursor counts other records); start a fresh run there (without --resume) or give it another "
               f"train.out_dir")
    written_by = checkpoint_program(checkpoint)
    if written_by is not None:
        if written_by != program:
            raise ValueError(f"train.out_dir={str(out_dir)!r} holds a `{_command(written_by)}` run (its checkpoint "
                             f"{checkpoint} was written by `{_command(written_by)}`): {refusal}")
        return
    # A checkpoint from before checkpoints named their program: the run records say whose run it is.
    records = [other for other, record in RUN_RECORDS.items() if (out_dir / record).exists()]
    if records in ([], [program]):
        return
    named = " and ".join(f"`{_command(other)}` ({RUN_RECORDS[other]})" for other in records)
    others = " and ".join(RUN_RECORDS[other] for other in records if other != program)
    raise ValueError(f"train.out_dir={str(out_dir)!r} holds the run record of {named}, and its checkpoint "
                     f"{checkpoint} does not name the program that wrote it: {refusal} (if it is a "
                     f"`{_command(program)}` run, remove {others} and resume again)")


def absolute_out_dir(config: RunConfig) -> str:
    """train.out_dir as an absolute path: actors run in other working directories, and under `ray job submit`
    a relative one lies in Ray's copy of the working directory, not where the command was typed."""
    return str(Path(config.train.out_dir).expanduser().resolve())


def start_run_directory(config: RunConfig, fresh: bool, program: str) -> Path:
    """Create `train.out_dir` and write its config.yaml; a `fresh` run (not resumed from a checkpoint) also
    removes an earlier run's checkpoint there and the other programs' run records (see clear_checkpoints).
    Called only once the model, optimizer and any resumed state loaded: a run that cannot start leaves its
    directory as it was (a later plain --resume still works)."""
    out_dir = Path(config.train.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a regular file there, a parent that is one, a path nobody may create
        raise ValueError(f"train.out_dir={str(out_dir)!r}: cannot create the run directory ({error})") from None
    if fresh:
        message = fresh_run_message(out_dir, clear_checkpoints(out_dir, program))
        if message is not None:
            tqdm.write(f"{program}: {message}", file=sys.stderr)
    write_atomically(out_dir / "config.yaml", dump_config(config))
    return out_dir


def jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of a run's JSON-lines output (metrics.jsonl, events.jsonl); lines cut short by a killed run
    and lines that hold no object are left out, as is a file not written yet."""
    rows: list[tuple[str, dict]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def restart_metrics(path: Path, step: int) -> None:
    """metrics.jsonl for a run starting at `step`: emptied for a fresh run (0); for a resumed one, the rows of
    steps up to `step` kept (those logged after its checkpoint are about to be redone). Replaced whole: a
    rewrite that a full disk cuts short keeps every row (a plain rewrite would have emptied the file first)."""
    kept: list[str] = []
    if step > 0:
        for line, row in jsonl_rows(path):
            row_step = row.get("step", 0)
            if isinstance(row_step, int) and row_step <= step:
                kept.append(line + "\n")
    write_atomically(path, "".join(kept))


def append_row(path: Path, row: dict) -> None:
    """One JSON line appended to `path` (metrics.jsonl), whole or not at all: what a write the file system refused
    (a full disk) got in is cut off again, so no half row stays. Opened for each row and never created: a run
    directory removed or moved during the run fails here (rows written to a deleted file would be lost)."""
    data = (json.dumps(row) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(descriptor).st_size
        try:
            written = 0
            while written < len(data):  # a write to a regular file may stop short (a file size limit)
                written += os.write(descriptor, data[written:])
        except OSError:
            os.ftruncate(descriptor, size)
            raise
    finally:
        os.close(descriptor)


@dataclass
class StepBatch:
    """One training step's data: its update (given the stage timer: backward and optimizer step or steps), the
    data cursor once it is trained, its tokens."""

    update: Callable[[StageTimes], StepResult]
    cursor: int
    tokens: int
    epoch: int | None = None  # the data stream's passes through this batch (see RunPosition); None: not counted


NONFINITE_KEY = "nonfinite_stats"  # names the stats a row left out because they were inf or nan


def finite_stats(stats: dict) -> dict:
    """`stats` without the float values that are inf or nan (a skipped step's loss, grad_norm), their names
    listed under NONFINITE_KEY. JSON has no such numbers (json.dumps writes Infinity, which strict readers
    refuse; pydantic writes null, which the service's report schema then refuses on resume); the
    skipped_nonfinite flag and skipped_steps say what happened."""
    left_out = [key for key, value in stats.items() if isinstance(value, float) and not math.isfinite(value)]
    if not left_out:
        return stats
    kept = {key: value for key, value in stats.items() if key not in left_out}
    return kept | {NONFINITE_KEY: ",".join(left_out)}


def warmup_warning(config: RunConfig) -> str | None:
    """A warm-up longer than the run never reaches optim.lr: say so (a run shortened to try a config, say)."""
    optim, steps = config.optim, config.train.steps
    if optim.warmup_steps <= steps or steps == 0:
        return None
    return (f"warning: optim.warmup_steps={optim.warmup_steps} is more than train.steps={steps}: the learning rate "
            f"rises to {learning_rate(optim, steps, steps):g} only, never optim.lr={optim.lr}")


def rate_change_warning(config: RunConfig, metrics_path: Path, step: int) -> str | None:
    """A resume whose schedule settings (optim.*, train.steps) give another learning rate than the run trained
    at, at any step up to `step` that metrics.jsonl logged (the last such step is named). Extending a cosine
    run's train.steps raises the rate, say, which the user should know before the loss curve shows it. Settings
    that agree with every logged rate and differ only after it (constant to cosine, resumed at step 1) go unsaid."""
    if step == 0:
        return None
    optim, steps = config.optim, config.train.steps
    differing = [row for _, row in jsonl_rows(metrics_path)
                 if isinstance(row.get("step"), int) and 0 < row["step"] <= step
                 and isinstance(row.get("lr"), (int, float)) and not isinstance(row.get("lr"), bool)
                 and not math.isclose(learning_rate(optim, row["step"], steps), row["lr"], rel_tol=1e-6)]
    if not differing:
        return None  # the same rates (or rows from before the schedule existed, or none logged)
    row = max(differing, key=lambda row: row["step"])
    now = learning_rate(optim, row["step"], steps)
    settings = (f"optim.lr={optim.lr}, optim.warmup_steps={optim.warmup_steps}, optim.schedule={optim.schedule!r}"
                f"{f', optim.min_lr_ratio={optim.min_lr_ratio}' if optim.schedule == 'cosine' else ''}, "
                f"train.steps={steps}")
    return (f"warning: the learning rate changes at this resume: step {row['step']} trained at {row['lr']:.6g}, where "
            f"this resume's settings ({settings}) give {now:.6g}; step {step + 1} trains at "
            f"{learning_rate(optim, step + 1, steps):.6g}")


class RunInterrupted(KeyboardInterrupt):
    """A run that Ctrl-C or SIGTERM stopped cleanly before train.steps, after its checkpoint: the command ends as an
    interrupted one (exit 130), not as a finished run."""


def interrupted_message(step: int, steps: int, resume_command: list[str], config: RunConfig | None = None) -> str:
    """What a run stopped by Ctrl-C or SIGTERM before train.steps says: where it stopped and how to go on. When
    `config` (the config.yaml the command reads) holds paths relative to this working directory, the command
    starts there: from elsewhere it would start a new run in another train.out_dir."""
    command = shlex.join(resume_command)
    if config is not None and relative_paths(config):
        command = f"cd {shlex.quote(os.getcwd())} && {command}"
    return f"interrupted at step {step} of train.steps={steps}; resume with `{command}`"


def relative_paths(config: RunConfig) -> list[str]:
    """The paths of `config` that are relative to the working directory: train.out_dir, and train.init_from,
    tokenizer, data.source or data.eval_source where one names a file here (they may name no file: synthetic)."""
    paths = [config.train.out_dir] if not Path(config.train.out_dir).is_absolute() else []
    named = [getattr(section, name) for section, name in input_path_fields(config)]
    return paths + [path for path in named if path and not Path(path).is_absolute() and Path(path).exists()]


@contextmanager
def stop_requests(desc: str) -> Iterator[Callable[[], bool]]:
    """While a run's steps run in the main thread: the first Ctrl-C or SIGTERM (`kill`, container runtimes) asks
    the run to stop after the step under way, which it then checkpoints; a second stops at once
    (KeyboardInterrupt). Yields whether a stop was asked. Off the main thread, and for a signal this process
    ignores, the handlers stay as they are."""
    requested = threading.Event()

    def ask_to_stop(signum: int, frame: object) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        try:  # os.write: the code the signal interrupted may be inside the buffered stderr's own write
            os.write(2, f"\n{desc}: stopping after the step under way, with a checkpoint (Ctrl-C again to stop "
                        f"at once)\n".encode())
        except OSError:
            pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(number) is not signal.SIG_IGN:
                previous[number] = signal.signal(number, ask_to_stop)
    try:
        yield requested.is_set
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def run_steps(config: RunConfig, model: FastWeightLM, optimizer: torch.optim.Optimizer, generator: torch.Generator,
              tokenizer: Tokenizer, next_batch: Callable[[int], StepBatch], start: RunPosition, desc: str,
              shown: tuple[str, ...], progress: bool, resume_command: list[str],
              evaluate: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
    """Steps `start.step + 1 .. config.train.steps`, each one batch, `next_batch(cursor)`, trained by its
    `update` (one or more optimizer steps: see RunPosition): a metrics.jsonl row every `log_every` steps (and
    the last), a checkpoint every `checkpoint_every` steps and at the end, then the plots; the progress bar
    shows the stats named in `shown`. `evaluate` (the held-out loss) adds its stats to the rows of the steps
    `train.evaluates_step` names, which are always written. Returns the last step's stats.

    Ctrl-C or SIGTERM ends the run after the step under way (see stop_requests) as it ends at train.steps (that
    step's row and a checkpoint), then raises RunInterrupted, having said that `resume_command` (the run's command
    line, with --resume) goes on."""
    out_dir = Path(config.train.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    position = start  # replaced, not changed, after each step
    saved_at = start.step  # a resumed run's checkpoint is there already
    last: dict[str, float] = {}
    divergence = Divergence(config)
    restart_metrics(metrics_path, position.step)
    for warning in (warmup_warning(config), rate_change_warning(config, metrics_path, position.step)):
        if warning is not None:
            tqdm.write(f"{desc}: {warning}", file=sys.stderr)
    with (tqdm(total=config.train.steps, initial=position.step, desc=desc, disable=not progress) as bar,
          stop_requests(desc) as stop_requested):
        while position.step < config.train.steps and not stop_requested():
            batch = next_batch(position.cursor)
            started = time.perf_counter()  # the data's reading is not part of the step
            times = StageTimes(config.train.device)
            lr = learning_rate(config.optim, position.step + 1, config.train.steps)
            set_learning_rate(optimizer, lr)
            outcome = batch.update(times)
            position = replace(position, step=position.step + 1, cursor=batch.cursor, epoch=batch.epoch or 0,
                               skipped_steps=position.skipped_steps + outcome.skipped)
            # Where the data stream stands after the batch, as a service run's rows say it.
            counted = {} if batch.epoch is None else {"cursor": batch.cursor, "data_epoch": batch.epoch}
            stats = outcome.stats | times.stats() | counted | {
                "step": position.step, "step_seconds": time.perf_counter() - started,
                "skipped_steps": position.skipped_steps, "tokens": batch.tokens, "lr": lr}
            evaluated = evaluate is not None and config.train.evaluates_step(position.step)
            if evaluated:
                stats |= evaluate()
            last = finite_stats(stats)
            if config.train.logs_step(position.step) or evaluated or stop_requested():  # a stop's step: its last
                write_row(metrics_path, last, start.program)
            diverged = divergence.add(position.step, outcome.stats)
            if diverged is not None:
                raise diverged
            bar.set_postfix({k: f"{last[k]:.3f}" for k in shown if k in last})
            bar.update(1)
            if config.train.checkpoint_every and position.step % config.train.checkpoint_every == 0:
                check_run_directory(metrics_path, start.program)
                save_run_checkpoint(out_dir, model, optimizer, position, generator, tokenizer,
                                    keep=config.train.keep_checkpoints)
                saved_at = position.step
        # Still under stop_requests: a first Ctrl-C now lets the last checkpoint (often the only one) be written.
        if saved_at != position.step:
            check_run_directory(metrics_path, start.program)
            save_run_checkpoint(out_dir, model, optimizer, position, generator, tokenizer,
                                keep=config.train.keep_checkpoints)
        if position.skipped_steps > start.skipped_steps:
            tqdm.write(f"{desc}: warning: {position.skipped_steps - start.skipped_steps} of steps {start.step + 1}.."
                       f"{position.step} skipped an update for a non-finite loss or gradient (skipped_nonfinite in "
                       f"metrics.jsonl; {describe_rates(config.optim)})", file=sys.stderr)
        unplotted = plot_run(out_dir)
        if unplotted is not None:
            tqdm.write(f"{desc}: {unplotted}", file=sys.stderr)
    if position.step < config.train.steps:
        tqdm.write(f"{desc}: {interrupted_message(position.step, config.train.steps, resume_command, config)}",
                   file=sys.stderr)
        raise RunInterrupted
    return last


def plot_run(out_dir: Path) -> str | None:
    """Draw a finished run's curves from its metrics.jsonl; a warning to show when the file system refused them
    (the run is complete, and the curves can be drawn again from metrics.jsonl), else None."""
    try:
        plot_metrics(out_dir / "metrics.jsonl", out_dir)
    except OSError as error:
        return f"warning: the plots were not written ({error}); the run's checkpoint and metrics.jsonl are complete"
    return None


def write_row(path: Path, row: dict, program: str) -> None:
    """A row of a run's JSON-lines output (metrics.jsonl, events.jsonl); a row that cannot be written stops the
    run, naming the file, the cause and the checkpoint it resumes from."""
    try:
        append_row(path, row)
    except FileNotFoundError:
        check_run_directory(path, program)
        raise
    except OSError as error:
        step = f"step {row['step']}'s row" if "step" in row else "a row"
        raise OSError(f"cannot write {step} to {path} ({error.strerror or error}): the run stops; "
                      f"{kept_checkpoint(path.parent, program)}") from None


def check_run_directory(path: Path, program: str) -> None:
    """The run directory is still there, holding the output file `path` the run started (metrics.jsonl): a
    directory removed or moved during a run would otherwise be made anew by its next checkpoint, without its
    config and earlier rows."""
    if not path.is_file():
        raise OSError(f"train.out_dir={str(path.parent)!r}: its {path.name} is gone (the run directory was "
                      f"removed or moved during the run): `{_command(program)}` stops rather than write its "
                      f"checkpoint into a new directory")


def check_device(device: str) -> None:
    """Refuse a `train.device` this machine cannot use (a CUDA device without a GPU that torch can use)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r}, but this machine has no CUDA GPU that torch "
                         f"{torch.__version__} can use: set --set train.device=cpu")


def prepare_model(config: RunConfig, training: bool = True) -> FastWeightLM:
    """The run's model on train.device: train.init_from's weights, else new ones seeded by train.seed;
    refused before anything is allocated when it cannot fit there (with its gradients and AdamW's moments
    when `training`)."""
    device = config.train.device
    # Checked where the model is placed: a Ray driver without a GPU may run a config meant for GPU nodes.
    check_device(device)
    dtype = DTYPES[config.train.dtype]
    init_from = config.train.init_from
    model_config = load_model_config(init_from) if init_from else config.model
    check_model_fits(model_config, dtype, device, training=training,
                     config_file=str(Path(init_from) / "config.json") if init_from else None)
    if config.train.init_from:
        model = load_model(config.train.init_from, dtype=dtype)
    else:
        torch.manual_seed(config.train.seed)
        model = build_model(config.model, dtype=dtype)
    return model.to(config.train.device)


def check_loop_reward(config: RunConfig) -> None:
    """Before anything trains: the reward of a REFINE run must be registered (after importing
    refine.reward_modules) and score tokens or hidden states, as this process has no text decoding.
    An NTP run has no rollouts to score (the main job's NTP stages inherit any reward)."""
    if config.train.mode != "ntp":
        check_run_reward(config.refine.reward, config.refine.reward_modules, decodes_text=False)


def finished_run(out_dir: Path, step: int, steps: int, program: str = "refine") -> dict:
    """A resume whose checkpoint already reached train.steps trains nothing: it says so and returns the last
    step's metrics row, as the service does. `program` (a RUN_RECORDS key) names who says it."""
    tqdm.write(f"{program}: nothing to train: the checkpoint in {out_dir} is at step {step}, train.steps={steps}",
               file=sys.stderr)
    rows = [row for _, row in jsonl_rows(out_dir / "metrics.jsonl") if row.get("step") == step]
    return rows[-1] if rows else {"step": step}


def train(config: RunConfig, resume: bool = False, progress: bool = True,
          resume_command: list[str] | None = None) -> dict[str, float]:
    """Run `config.train.steps` steps; returns the last step's stats. A stop (Ctrl-C, SIGTERM) says that
    `resume_command` goes on (default: `refine train OUT_DIR/config.yaml --local --resume`)."""
    check_mini_batches(config)
    check_loop_reward(config)
    tune_allocator()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    tokenizer = run_tokenizer(config)
    config = fit_to_tokenizer(config, tokenizer)
    model = prepare_model(config)
    optimizer = make_optimizer(model, config.optim)
    generator = torch.Generator(device=config.train.device).manual_seed(config.train.seed)
    ref_model = None
    if config.refine.kl_coef > 0 and config.train.mode != "ntp":
        ref_model = prepare_model(config, training=False).requires_grad_(False)

    start = resume_from(Path(config.train.out_dir), resume, model, optimizer, generator, "refine", tokenizer)
    if start.step and start.step >= config.train.steps:  # the run directory (config.yaml too) stays as it is
        return finished_run(Path(config.train.out_dir), start.step, config.train.steps)
    if start.step:
        check_resumed_cursor(config, Path(config.train.out_dir))
    batches: Iterator[DocumentBatch] = document_batches(config, tokenizer, start_cursor=start.cursor)
    if start.step < config.train.steps:  # read before anything is written: a source that yields nothing fails here
        try:
            first = next(batches)
        except (FileNotFoundError, DataSourceError) as error:  # the service's check names the field alike
            if config.data.source == "synthetic":
                raise
            raise DataSourceError(f"data.source={config.data.source!r}: {error}") from None
        batches = itertools.chain([first], batches)
    evaluate = None if config.data.eval_source is None else heldout_evaluator(config, model, tokenizer)
    out_dir = start_run_directory(config, fresh=start.step == 0, program="refine")
    changed = check_source(config, out_dir, resumed=start.step > 0)
    if changed:
        tqdm.write(f"refine: warning: {changed}", file=sys.stderr)

    # The stream's passes, counted as the service's orchestrator counts them: onepass and reference runs sample
    # each batch's rollouts from its own stream (batch_generator), as the service's rollout workers do, so that
    # a service run at max_staleness=0 trains as this loop does. A fused run samples in the learner's forward,
    # from the run's generator, as a colocated service run does.
    passes = DataPosition(epoch=start.epoch, cursor=start.cursor if start.step else -1,
                          span=shuffled_pass_span(config, tokenizer) if config.data.shuffle else 0)

    def next_batch(_: int) -> StepBatch:  # the stream carries its own cursor
        batch = next(batches).to(config.train.device)
        epoch = passes.advance(batch.cursor, batch.cursors)
        sampling = (batch_generator(config.train.seed, epoch, batch.cursor, config.train.device)
                    if config.train.mode in ("onepass", "reference") else generator)
        return StepBatch(update=lambda times: train_step(model, optimizer, batch, config, sampling, ref_model, times),
                         cursor=batch.cursor, tokens=int(batch.lengths.sum()), epoch=epoch)

    # --local: the command runs the loop whatever train.mode is (an NTP-only or reference run does without it).
    resume_command = resume_command or ["refine", "train", str(out_dir.resolve() / "config.yaml"), "--local",
                                        "--resume"]
    return run_steps(config, model, optimizer, generator, tokenizer, next_batch, start,
                     desc=f"train[{config.train.mode}]", shown=("loss", "reward_mean"), progress=progress,
                     resume_command=resume_command, evaluate=evaluate)
