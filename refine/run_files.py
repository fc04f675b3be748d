"""A run directory and its files other than the checkpoints (refine.checkpoints): config.yaml, the JSON-lines
rows (metrics.jsonl, events.jsonl) and the PNG curves drawn from metrics.jsonl.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


from refine.checkpoints import (
    RunWriteError, check_inputs_outside_checkpoints, clear_checkpoints, fresh_run_message, kept_checkpoint,
    program_command,
)
from refine.config import RunConfig, dump_config
from refine.files import write_atomically
from refine.plots import plot_metrics
from refine.runtime import note


def absolute_out_dir(config: RunConfig) -> str:
    """train.out_dir as an absolute path: actors run in other working directories, and under `ray job submit`
    a relative one lies in Ray's copy of the working directory, not where the command was typed."""
    return str(Path(config.train.out_dir).expanduser().resolve())


def check_resumed_run(config_file: str | None, config: RunConfig) -> None:
    """With --resume from a run's own config.yaml, the run to continue is the folder that file is in. A relative
    train.out_dir resolves against the working directory, and a moved run's absolute one names its old place:
    either continued another run, or started a new one from step 0, without a word."""
    if config_file is None:
        return
    folder = Path(config_file).expanduser().resolve().parent
    if not ((folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()):
        return  # a config file that is not a run's (configs/*.yaml): train.out_dir says where the run is
    out_dir = Path(absolute_out_dir(config))
    if out_dir != folder:
        raise ValueError(f"--resume: {config_file} is the config of the run in {str(folder)!r}, but its "
                         f"train.out_dir={config.train.out_dir!r} is {str(out_dir)!r} from here: add --set "
                         f"train.out_dir={folder} to continue the run in {str(folder)!r}")


# The JSON-lines files a run appends its rows to in train.out_dir: readable as data, so a data input must not be one.
RUN_ROWS = ("metrics.jsonl", "events.jsonl")


def check_data_apart_from_run(config: RunConfig, task_file: str | Path | None = None) -> None:
    """Refuse data the run would write over or read back as documents, fresh or resumed: data.source,
    data.eval_source or `task_file` (posttrain's --data) naming the run's own metrics.jsonl or events.jsonl or a
    file in its checkpoints folder, or a folder that holds train.out_dir (its rows would be read as documents).
    A fresh run overwrote such a metrics.jsonl with its own rows, without a word."""
    out_dir = Path(absolute_out_dir(config))
    inputs = [("data.source", config.data.source), ("data.eval_source", config.data.eval_source)]
    if task_file is not None:
        inputs.append(("--data", str(task_file)))
    for field, value in inputs:
        if not value or value == "synthetic":  # the generated corpus, whatever a file of that name holds
            continue
        path = Path(value).expanduser()
        if not path.exists():  # the data layer names a missing source
            continue
        path = path.resolve()
        if path.is_dir():
            inside = out_dir.is_relative_to(path)
            # The data layer leaves hidden folders out (refine.data.formats): a run in data/.runs/x is not read.
            if inside and not any(part.startswith(".") for part in out_dir.relative_to(path).parts):
                raise ValueError(f"{field}={value!r} is a folder that holds train.out_dir={config.train.out_dir!r}: "
                                 f"the run's own files ({', '.join(RUN_ROWS)}) would be read as documents; give the "
                                 f"run a train.out_dir outside it")
        elif (path.parent == out_dir and path.name in RUN_ROWS) or path.is_relative_to(out_dir / "checkpoints"):
            raise ValueError(f"{field}={value!r} is a file that this run writes (train.out_dir="
                             f"{config.train.out_dir!r}): copy it out of the run directory first, or give the run "
                             f"another train.out_dir")


def start_run_directory(config: RunConfig, fresh: bool, program: str) -> Path:
    """Create `train.out_dir` and write its config.yaml; a `fresh` run (not resumed from a checkpoint) also
    removes an earlier run's checkpoint there and the other programs' run records (see clear_checkpoints).
    Called only once the model, optimizer and any resumed state loaded: a run that cannot start leaves its
    directory as it was (a later plain --resume still works)."""
    if fresh:
        check_inputs_outside_checkpoints(config)
    out_dir = Path(config.train.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a regular file there, a parent that is one, a path nobody may create
        raise ValueError(f"train.out_dir={str(out_dir)!r}: cannot create the run directory ({error})") from None
    if fresh:
        message = fresh_run_message(out_dir, clear_checkpoints(out_dir, program))
        if message is not None:
            note(f"{program}: {message}")
    write_atomically(out_dir / "config.yaml", dump_config(config))
    return out_dir


def jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of a run's JSON-lines output (metrics.jsonl, events.jsonl); lines cut short by a killed run
    and lines that hold no object are left out, as is a file not written yet."""
    return _rows(path.read_text()) if path.exists() else []


def _rows(text: str) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def keep_rows(path: Path, keep: Callable[[dict], bool] | None) -> None:
    """A run's JSON-lines output with only the rows `keep` accepts (None: none, a fresh run's), for a run starting
    or resuming. Replaced whole when rows go: a rewrite that a full disk cuts short keeps every row (a plain rewrite
    would have emptied the file first). Left as it is when none goes, so that a `tail -f` started before the
    resume follows it on."""
    text = path.read_text() if path.exists() else ""
    kept = "" if keep is None else "".join(line + "\n" for line, row in _rows(text) if keep(row))
    if path.exists() and kept == text:
        return
    write_atomically(path, kept)


def restart_metrics(path: Path, step: int) -> None:
    """metrics.jsonl for a run starting at `step`: emptied for a fresh run (0); for a resumed one, the rows of
    steps up to `step` kept (those logged after its checkpoint are about to be redone). See keep_rows."""

    def before_the_checkpoint(row: dict) -> bool:
        row_step = row.get("step", 0)
        return isinstance(row_step, int) and row_step <= step

    keep_rows(path, before_the_checkpoint if step > 0 else None)


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
        raise RunWriteError(f"cannot write {step} to {path} ({error.strerror or error}): the run stops; "
                            f"{kept_checkpoint(path.parent)}") from None


def check_run_directory(path: Path, program: str) -> None:
    """The run directory is still there, holding the output file `path` the run started (metrics.jsonl): a
    directory removed or moved during a run would otherwise be made anew by its next checkpoint, without its
    config and earlier rows."""
    if not path.is_file():
        raise OSError(f"train.out_dir={str(path.parent)!r}: its {path.name} is gone (the run directory was "
                      f"removed or moved during the run): `{program_command(program)}` stops rather than write its "
                      f"checkpoint into a new directory")


def plot_run(out_dir: Path) -> str | None:
    """Draw a finished run's curves from its metrics.jsonl; a warning to show when the file system refused them
    (the run is complete, and the curves can be drawn again from metrics.jsonl), else None."""
    try:
        plot_metrics(out_dir / "metrics.jsonl", out_dir)
    except OSError as error:
        return f"warning: the plots were not written ({error}); the run's checkpoint and metrics.jsonl are complete"
    return None


def finished_run(out_dir: Path, step: int, steps: int, program: str = "refine") -> dict:
    """A resume whose checkpoint already reached train.steps trains nothing: it says so and returns the last
    step's metrics row, as the service does. `program` (a RUN_RECORDS key) names who says it."""
    note(f"{program}: nothing to train: the checkpoint in {out_dir} is at step {step}, train.steps={steps}")
    rows = [row for _, row in jsonl_rows(out_dir / "metrics.jsonl") if row.get("step") == step]
    return rows[-1] if rows else {"step": step}
