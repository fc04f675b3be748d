"""The single-process training loop: NTP or REFINE (one-pass, fused or reference) over a document source.

Used from notebooks, by `refine train --local`, and as the baseline the distributed service is
measured against. A run directory gets config.yaml, metrics.jsonl, checkpoints/ and PNG curves
(refine.run_files, refine.checkpoints); each step's optimizer updates are refine.step's.
"""

from __future__ import annotations

import itertools
import math
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from refine.algorithm.rewards import check_run_reward
from refine.algorithm.rollout import batch_generator
from refine.checkpoints import (
    RunPosition, check_inputs_outside_checkpoints, resume_command_named, resume_from, save_run_checkpoint,
)
from refine.config import DTYPES, RunConfig, fit_to_tokenizer, input_path_fields, run_tokenizer
from refine.data.batches import DocumentBatch
from refine.data.sources import DataSourceError
from refine.data.stream import DataPosition, check_resumed_cursor, check_source, document_batches, shuffled_pass_span
from refine.evaluation.heldout import heldout_evaluator
from refine.models import FastWeightLM, build_model, load_model, load_model_config
from refine.models.size import check_model_fits
from refine.optim import describe_rates, learning_rate, set_learning_rate
from refine.run_files import (
    check_data_apart_from_run, check_run_directory, finished_run, jsonl_rows, plot_run, restart_metrics,
    start_run_directory, write_row,
)
from refine.run_lock import run_directory_lock
from refine.runtime import StageTimes, callers_torch_state_kept, note, progress_bar, tune_allocator
from refine.step import Divergence, StepResult, check_mini_batches, make_optimizer, train_step
from refine.tokenizer import Tokenizer


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


def killed_message(checkpoint_step: int | None, steps: int, resume_command: list[str],
                   config: RunConfig | None = None) -> str:
    """What a run killed at once (a second Ctrl-C) says: the step its last checkpoint holds (None: it has none yet),
    and how to go on (see interrupted_message)."""
    command = shlex.join(resume_command)
    if config is not None and relative_paths(config):
        command = f"cd {shlex.quote(os.getcwd())} && {command}"
    if checkpoint_step is None:
        return f"killed at once, before its first checkpoint (a resume starts at step 0); resume with `{command}`"
    return (f"killed at once: its last checkpoint holds step {checkpoint_step} of train.steps={steps}; "
            f"resume with `{command}`")


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
              evaluate: Callable[[], dict[str, float]] | None = None, job_stage: bool = False) -> dict[str, float]:
    """Steps `start.step + 1 .. config.train.steps`, each one batch, `next_batch(cursor)`, trained by its
    `update` (one or more optimizer steps: see RunPosition): a metrics.jsonl row every `log_every` steps (and
    the last), a checkpoint every `checkpoint_every` steps and at the end, then the plots; the progress bar
    shows the stats named in `shown`. `evaluate` (the held-out loss) adds its stats to the rows of the steps
    `train.evaluates_step` names, which are always written. Returns the last step's stats.

    Ctrl-C or SIGTERM ends the run after the step under way (see stop_requests) as it ends at train.steps (that
    step's row and a checkpoint), then raises RunInterrupted, having said that `resume_command` (the run's command
    line, with --resume) goes on. A stop asked during the last step ends a run on its own as finished (its work is
    done), but a `job_stage` (one stage of the main job) with RunInterrupted too: the job must not go on to its next
    stage."""
    out_dir = Path(config.train.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    position = start  # replaced, not changed, after each step
    saved_at = start.step  # a resumed run's checkpoint is there already
    last: dict[str, float] = {}
    divergence = Divergence(config)
    restart_metrics(metrics_path, position.step)
    for warning in (warmup_warning(config), rate_change_warning(config, metrics_path, position.step)):
        if warning is not None:
            note(f"{desc}: {warning}")
    try:
        with (resume_command_named(out_dir, resume_command),
              progress_bar(total=config.train.steps, initial=position.step, desc=desc, disable=not progress) as bar,
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
                note(f"{desc}: warning: {position.skipped_steps - start.skipped_steps} of steps {start.step + 1}.."
                     f"{position.step} skipped an update for a non-finite loss or gradient (skipped_nonfinite in "
                     f"metrics.jsonl; {describe_rates(config.optim)})")
            unplotted = plot_run(out_dir)
            if unplotted is not None:
                note(f"{desc}: {unplotted}")
    except KeyboardInterrupt:  # a second Ctrl-C: the run ends at once, with the last checkpoint it wrote
        checkpoint_step = saved_at if saved_at or start.step else None  # step 0: a fresh run has none
        note(f"{desc}: {killed_message(checkpoint_step, config.train.steps, resume_command, config)}")
        raise
    if position.step < config.train.steps or (job_stage and stop_requested()):
        note(f"{desc}: {interrupted_message(position.step, config.train.steps, resume_command, config)}")
        raise RunInterrupted
    return last


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


def first_batch_read(config: RunConfig, tokenizer: Tokenizer, start_cursor: int) -> Iterator[DocumentBatch]:
    """The run's document batches from `start_cursor`, the first one read already: a source that yields no
    document (every one filtered out, a bad first row) fails here, naming data.source, before the run directory
    is touched. The service's driver reads it too, before Ray starts (services.run_checks.check_data_source)."""
    batches = document_batches(config, tokenizer, start_cursor=start_cursor)
    try:
        first = next(batches)
    except (FileNotFoundError, DataSourceError) as error:
        if config.data.source == "synthetic":  # its errors name the data.* settings that generate it
            raise
        raise DataSourceError(f"data.source={config.data.source!r}: {error}") from None
    return itertools.chain([first], batches)


def train(config: RunConfig, resume: bool = False, progress: bool = True, resume_command: list[str] | None = None,
          job_stage: bool = False) -> dict[str, float]:
    """Run `config.train.steps` steps; returns the last step's stats. A stop (Ctrl-C, SIGTERM) says that
    `resume_command` goes on (default: `refine train OUT_DIR/config.yaml --local --resume`); a `job_stage` (of the
    main job) raises RunInterrupted for a stop asked during its last step too (see run_steps). torch's global
    generator and thread count are the caller's again afterwards."""
    with callers_torch_state_kept(config.train.device):
        return _train(config, resume, progress, resume_command, job_stage)


def _train(config: RunConfig, resume: bool, progress: bool, resume_command: list[str] | None,
           job_stage: bool) -> dict[str, float]:
    if config.demo is not None:  # its stages' steps and rates are in the demo section, which one run does not read
        raise ValueError("the config has a demo section: it describes the main job, NTP then REFINE vs NTP "
                         "(refine.experiment.run_comparison, as `refine train` runs it); train() trains one run: set "
                         "demo to None (--set demo=null)")
    check_mini_batches(config)
    check_loop_reward(config)
    check_data_apart_from_run(config)
    if not resume:  # before the model loads: a tokenizer there may be what fails first
        check_inputs_outside_checkpoints(config)
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
    batches = first_batch_read(config, tokenizer, start.cursor)  # before anything is written
    evaluate = None if config.data.eval_source is None else heldout_evaluator(config, model, tokenizer)
    with run_directory_lock(config.train.out_dir, "refine train --local"):  # held until the run ends
        out_dir = start_run_directory(config, fresh=start.step == 0, program="refine")
        changed = check_source(config, out_dir, resumed=start.step > 0)
        if changed:
            note(f"refine: warning: {changed}")

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
            return StepBatch(
                update=lambda times: train_step(model, optimizer, batch, config, sampling, ref_model, times),
                cursor=batch.cursor, tokens=int(batch.lengths.sum()), epoch=epoch)

        # --local: the command runs the loop whatever train.mode is (an NTP-only or reference run does without it).
        resume_command = resume_command or ["refine", "train", str(out_dir.resolve() / "config.yaml"), "--local",
                                            "--resume"]
        return run_steps(config, model, optimizer, generator, tokenizer, next_batch, start,
                         desc=f"train[{config.train.mode}]", shown=("loss", "reward_mean"), progress=progress,
                         resume_command=resume_command, evaluate=evaluate, job_stage=job_stage)
