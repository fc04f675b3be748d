"""Process-wide settings for training and rollout processes (the CPU allocator, SIGTERM); a device timing helper.

glibc's malloc serves large blocks with fresh mmap'd pages and hands freed heap memory back to the
kernel, so a CPU training step that allocates and frees the same multi-megabyte activations every
step pays a page fault per 4 KiB on every touch of them (PyTorch's CPU tuning guide points at the
same cost when it recommends jemalloc or tcmalloc). Keeping blocks up to 32 MiB on the heap and the
freed heap mapped removes most of those faults: on a 2-core VM this cut a 4K-token REFINE step's
page faults by about half and the rollout teacher-forcing pass by a quarter. The trade is that the
process keeps its peak heap mapped, as caching allocators do.

Entry points (the CLI, the service roles, the benchmarks) call `tune_allocator()` once at start;
REFINE_MALLOC_TUNING=0 turns it off. A no-op where glibc's mallopt is unavailable.

`sigterm_as_ctrl_c()` makes SIGTERM (`kill`, `ray job stop`, schedulers, container runtimes) stop what runs
as Ctrl-C does, for the CLI's commands and a service run's driver.

`synchronize(device)` waits for a GPU's queued work, so that a wall-clock interval covers it;
`StageTimes` adds up such intervals per named stage (the benchmarks' timings and breakdowns, the
training steps' per-phase seconds).

`progress_bar(...)` and `note(text)` draw progress bars and write notes (warnings, what a run is doing) on `PROGRESS`,
the process's stderr for as long as it takes them: a stderr that is closed, full or piped to a reader that went
away (`2>&-`, `2>/dev/full`, `2> >(head)`) ends the progress and notes, never the run.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ContextManager, NoReturn

from tqdm import tqdm

if TYPE_CHECKING:  # torch is imported where it is used: the `refine` command's entry point loads this module first
    import torch

ENV_SWITCH = "REFINE_MALLOC_TUNING"
# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit for this setting on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep large CPU tensors' memory mapped between steps; True if the settings were applied."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return _tuned
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return _tuned
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
    return _tuned


# Set when a SIGTERM was raised as Ctrl-C: a signal to the whole process group (`timeout`, systemd, Slurm) reaches a
# local Ray's processes too, unlike Ctrl-C, which they block; what tears such a Ray down asks (`sigterm_received`).
_sigterm = threading.Event()


def _raise_ctrl_c(signum: int, frame: object) -> None:
    _sigterm.set()
    raise KeyboardInterrupt


def sigterm_received() -> bool:
    """Whether SIGTERM stopped what runs under the innermost `sigterm_as_ctrl_c` opened since."""
    return _sigterm.is_set()


# Set by what leaves this process holding a client that cannot be torn down: the Ray client of a local Ray whose
# processes were killed (its C++ core would wait for them, then crash in the interpreter's finalization).
_end_without_finalizing = threading.Event()


def end_without_finalizing() -> None:
    """Ask the command to end its process once its output is flushed, without the interpreter's finalization
    (`command_exit`)."""
    _end_without_finalizing.set()


def command_exit(code: int) -> int:
    """`code`, for sys.exit; or, when asked (`end_without_finalizing`), the process ends here with it."""
    if not _end_without_finalizing.is_set():
        return code
    command_exit_now(code)


def command_exit_now(code: int) -> NoReturn:
    """End the process with `code` once its output is flushed, without the interpreter's finalization: from any
    thread, where the main one may be stuck in a client's call that never returns."""
    logging.shutdown()  # flushes the log handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to flush
            pass
    os._exit(code)


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """While open, SIGTERM raises KeyboardInterrupt, as Ctrl-C does; the handler before is put back on exit (a
    command called in-process, from tests or notebooks, leaves its caller's). Off the main thread, and where this
    process ignores SIGTERM, the handler stays as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_ctrl_c)
    _sigterm.clear()
    try:
        yield
    finally:  # None: a handler set outside Python, which Python cannot put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """While open, Ctrl-C (SIGINT) does nothing: for a command's end that must not be cut short, where the outcome is
    settled already (a service run killing its actors and deleting its Redis keys). Off the main thread, and where
    SIGINT's handler is not Python's, it stays as it is."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def callers_torch_state_kept(device: str) -> Iterator[None]:
    """A library call that seeds torch's global generator (a new model's initialization) and sets its thread count
    (train.threads) leaves the caller's as they were: a notebook's own seeding and threads hold after it."""
    import torch

    threads = torch.get_num_threads()
    place = torch.device(device)
    # A CUDA device where torch has none fails later, named (check_device), not in fork_rng.
    cuda = [place.index or 0] if place.type == "cuda" and torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        torch.set_num_threads(threads)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); nothing to wait for on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageTimes:
    """Wall-clock seconds per named stage, added up over calls; device work is waited for at both ends."""

    def __init__(self, device: str | torch.device = "cpu"):
        import torch

        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def stats(self) -> dict[str, float]:
        """`<stage>_seconds` entries, as training steps report them (metrics.jsonl, refine_step_seconds)."""
        return {f"{name}_seconds": seconds for name, seconds in self.seconds.items()}


def timed_stage(times: StageTimes | None, name: str) -> ContextManager[None]:
    """`times.stage(name)`, or nothing at all when no one is timing (no device waits)."""
    return nullcontext() if times is None else times.stage(name)


class ProgressStream:
    """sys.stderr (looked up at each write: tests and notebooks swap it) until a write or flush fails or it is None;
    from then on it takes every write and writes nothing. For progress and notes only: they are not worth a run,
    whereas the error that ends a command keeps going to sys.stderr itself."""

    def __init__(self) -> None:
        self.lost = False

    def _stream(self) -> Any:
        stream = None if self.lost else sys.stderr
        self.lost = stream is None
        return stream

    def write(self, text: str) -> int:
        stream = self._stream()
        if stream is not None:
            try:
                stream.write(text)
            except (OSError, ValueError):  # a broken pipe, a full disk, a closed file: no more progress
                self.lost = True
        return len(text)

    def flush(self) -> None:
        stream = self._stream()
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                self.lost = True

    def fileno(self) -> int:
        """stderr's, for tqdm to measure the terminal's width (an OSError there means no terminal)."""
        stream = self._stream()
        if stream is None:
            raise OSError("no stderr")
        return stream.fileno()

    @property
    def encoding(self) -> str | None:  # tqdm draws its bar with Unicode blocks where this is UTF-8
        return getattr(sys.stderr, "encoding", None)


PROGRESS = ProgressStream()


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar on PROGRESS; as wide as stderr's terminal (tqdm measures the terminal by itself only on sys.stderr,
    so here at each refresh)."""
    return tqdm(file=PROGRESS, dynamic_ncols=True, **kwargs)


def note(text: str) -> None:
    """A line on PROGRESS, above any progress bar (tqdm takes the bars off and draws them again below it)."""
    tqdm.write(text, file=PROGRESS)
