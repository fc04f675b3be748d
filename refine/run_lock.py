"""One run at a time in a run directory: the process that trains into `train.out_dir` holds a lock on it.

Two runs in one directory (a second `refine train`, a `--resume` of a run still going, a service run beside a
`--local` one) replaced each other's config.yaml, interleaved their metrics.jsonl rows and removed each other's
checkpoints, most often without an error. The lock is an advisory `flock` on OUT_DIR/run.lock, which records who
holds it: the kernel releases it when the holder's process ends, however it ends, so a killed run never leaves a
stale lock behind. The file is removed when the run ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "RunDirectoryInUse", "run_directory_lock"]

LOCK_NAME = "run.lock"


class RunDirectoryInUse(ValueError):
    """Another process trains into the run directory."""


@contextmanager
def run_directory_lock(out_dir: str | Path, program: str) -> Iterator[None]:
    """Hold `out_dir` (created if missing) for a run of `program` ("refine train", say) while the block runs;
    another holder is refused, named. A directory this made and the run left empty is removed again."""
    directory = Path(out_dir)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a regular file there, a parent that is one, a path nobody may create
        raise ValueError(f"train.out_dir={str(directory)!r}: cannot create the run directory ({error})") from None
    path = directory / LOCK_NAME
    descriptor = _acquire(path, directory)
    try:
        holder = {"program": program, "pid": os.getpid(), "host": socket.gethostname(),
                  "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(holder).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiter then finds no file, or its own new one
        os.close(descriptor)
        if created:
            try:
                directory.rmdir()  # only when empty: a run that could not start leaves no folder behind
            except OSError:
                pass


def _acquire(path: Path, directory: Path) -> int:
    """An open descriptor of `path` holding its lock. A holder removes the file on its way out: a lock taken on
    a file already removed guards nothing, so the file locked must still be the one under that name."""
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ValueError(f"train.out_dir={str(directory)!r}: cannot create its {LOCK_NAME} "
                             f"({error.strerror or error})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(descriptor)
            os.close(descriptor)
            raise RunDirectoryInUse(
                f"train.out_dir={str(directory)!r} is in use by another run ({holder}): two runs in one directory "
                f"replace each other's config.yaml, rows and checkpoints; wait for that run to end (a --resume "
                f"continues it then), or give this run another train.out_dir") from None
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return descriptor
        os.close(descriptor)  # removed by the holder that just ended: lock the new file


def _describe_holder(descriptor: int) -> str:
    """Who holds the lock, from what it wrote (empty while it is just starting)."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or not holder:
        return "a run just starting"
    return (f"`{holder.get('program', '?')}`, pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {holder.get('started_at', '?')}")
