"""A run's checkpoints: checkpoints/latest written whole or not at all (and kept as checkpoints/step-NNNNNNNN
when train.keep_checkpoints asks), read back on --resume, with the checks that a resume continues the same
program's run, on the same model and tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from refine.config import RunConfig
from refine.files import error_chain, file_system_error, sync_directory, sync_tree
from refine.models import FastWeightLM, load_model, load_model_config, save_model
from refine.runtime import note
from refine.tokenizer import Tokenizer, same_tokenizer, save_tokenizer_files, tokenizer_name


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
                                         f"({reason}): its partial files are removed; {kept_checkpoint(out_dir)}"):
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
    refused (a full disk, a file too large) becomes one RunWriteError, `failure(the refusal's reason)`, and one a
    Ctrl-C stopped is a KeyboardInterrupt again."""
    try:
        yield
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        interrupted = any(isinstance(earlier, KeyboardInterrupt) for earlier in error_chain(error))
        if interrupted and not isinstance(error, KeyboardInterrupt):
            # torch.save's zip writer, its write stopped by a Ctrl-C, fails again on closing ("unexpected pos"): that
            # RuntimeError, raised in place of the Ctrl-C, would end the command with a traceback and exit 1.
            raise KeyboardInterrupt from error
        cause = file_system_error(error)
        if cause is None:
            raise
        raise RunWriteError(failure(_reason(cause))) from None


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
                                         f"the checkpoint {latest} is intact"):
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


class RunWriteError(OSError):
    """A file of the run (a checkpoint, a metrics.jsonl row) the file system refused: the run stops. The message
    says what it resumes from; the command that runs it adds how (`resume_command_named`): only it knows its own
    command line (a bare `refine train --resume` would run the main job instead)."""


def kept_checkpoint(out_dir: str | Path) -> str:
    """What a run stopped by a failed write can resume from, for the end of its error message."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint.exists():
        return f"the earlier checkpoint {checkpoint} is intact"
    return "the run has no earlier checkpoint"


@contextmanager
def resume_command_named(out_dir: str | Path, resume_command: Sequence[str]) -> Iterator[None]:
    """A RunWriteError raised inside ends with the command that goes on: from the intact checkpoint, or from step 0
    without one."""
    try:
        yield
    except RunWriteError as error:
        how = "continues from it" if latest_checkpoint(out_dir).exists() else "starts it over"
        raise RunWriteError(f"{error}: `{shlex.join(resume_command)}` {how}") from None


def _reason(error: OSError) -> str:
    """An OSError's cause, with the file it names: "No space left on device", "File too large: '/x'"."""
    if error.strerror is None:
        return str(error)
    return error.strerror if error.filename is None else f"{error.strerror}: {str(error.filename)!r}"


def check_inputs_outside_checkpoints(config: RunConfig) -> None:
    """Refuse, for a fresh run, a model or tokenizer to start from inside the run's own checkpoints folder: a fresh
    run empties that folder (a killed first attempt could then not be started again). A resumed run may take its
    checkpoint's tokenizer (the remedy check_resumed_tokenizer names)."""
    checkpoints = Path(os.path.abspath(Path(config.train.out_dir) / "checkpoints"))
    for field, value in (("train.init_from", config.train.init_from), ("tokenizer", config.tokenizer)):
        if value is not None and Path(os.path.abspath(value)).resolve().is_relative_to(checkpoints.resolve()):
            raise ValueError(f"{field}={value!r} lies in this run's own checkpoints folder {str(checkpoints)!r} "
                             f"(train.out_dir={config.train.out_dir!r}), which a fresh run empties: copy it out "
                             f"first, or give the run another train.out_dir")


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
        check_resumed_dtype(out_dir, next(model.parameters()).dtype)
        return replace(load_checkpoint(checkpoint, model, optimizer, generator), program=program)
    if resume:
        check_kept_without_latest(out_dir)
        note(f"{program}: no checkpoint at {checkpoint} to resume from: starting at step 0")
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


def check_resumed_dtype(out_dir: str | Path, dtype: torch.dtype) -> None:
    """Refuse a --resume in another train.dtype than the latest checkpoint's model: a bfloat16 run's progress lives
    in its optimizer's float32 master weights, which a float32 resume would drop for the rounded model (and a
    bfloat16 resume of a float32 run would round its weights before taking their masters)."""
    model_dir = latest_checkpoint(out_dir) / "model"
    try:
        values = json.loads((model_dir / "config.json").read_text())
        saved = values.get("torch_dtype") or values.get("dtype")
    except (OSError, ValueError, AttributeError):  # no checkpoint, or a damaged one: loading it says so
        return
    wanted = str(dtype).removeprefix("torch.")
    if isinstance(saved, str) and saved != wanted:
        raise ValueError(f"--resume: train.dtype={wanted}, but checkpoint {model_dir.parent} was trained in {saved} "
                         f"(its weights, and a bfloat16 run's float32 master weights in trainer.pt, would not carry "
                         f"over): resume with --set train.dtype={saved}, or start a new run from the checkpoint "
                         f"(train.init_from={model_dir}) in {wanted}")


def program_command(program: str) -> str:
    """The command line that runs `program` (a RUN_RECORDS key), as messages name it: "refine train" for "refine"."""
    return "refine train" if program == "refine" else program


def check_resumed_program(out_dir: Path, program: str) -> None:
    """Refuse a --resume of another program's run: its checkpoint's data cursor counts other records (documents
    against task examples), and the resumed run would splice its rows into the other's metrics.jsonl. The latest
    checkpoint says which program wrote it (PROGRAM_FILE); only one written before checkpoints said so is judged
    by the run records in the directory, and refused when they do not name `program` alone."""
    checkpoint = latest_checkpoint(out_dir)
    if not checkpoint.exists():
        return
    refusal = (f"`{program_command(program)} --resume` continues only runs of `{program_command(program)}` (the "
               f"checkpoint's data cursor counts other records); start a fresh run there (without --resume) or give "
               f"it another train.out_dir")
    written_by = checkpoint_program(checkpoint)
    if written_by is not None:
        if written_by != program:
            raise ValueError(f"train.out_dir={str(out_dir)!r} holds a `{program_command(written_by)}` run (its "
                             f"checkpoint {checkpoint} was written by `{program_command(written_by)}`): {refusal}")
        return
    # A checkpoint from before checkpoints named their program: the run records say whose run it is.
    records = [other for other, record in RUN_RECORDS.items() if (out_dir / record).exists()]
    if records in ([], [program]):
        return
    named = " and ".join(f"`{program_command(other)}` ({RUN_RECORDS[other]})" for other in records)
    others = " and ".join(RUN_RECORDS[other] for other in records if other != program)
    raise ValueError(f"train.out_dir={str(out_dir)!r} holds the run record of {named}, and its checkpoint "
                     f"{checkpoint} does not name the program that wrote it: {refusal} (if it is a "
                     f"`{program_command(program)}` run, remove {others} and resume again)")
