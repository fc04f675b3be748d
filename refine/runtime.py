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
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import ContextManager

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


def _raise_ctrl_c(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """While open, SIGTERM raises KeyboardInterrupt, as Ctrl-C does; the handler before is put back on exit (a
    command called in-process, from tests or notebooks, leaves its caller's). Off the main thread, and where this
    process ignores SIGTERM, the handler stays as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_ctrl_c)
    try:
        yield
    finally:  # None: a handler set outside Python, which Python cannot put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); nothing to wait for on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageTimes:
    """Wall-clock seconds per named stage, added up over calls; device work is waited for at both ends."""

    def __init__(self, device: str | torch.device = "cpu"):
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
