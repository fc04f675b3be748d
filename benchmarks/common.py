"""What the step and rollout benchmarks share: their --device check, the spread of their rounds and the
machine a row was measured on."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def device_arg(text: str) -> str:
    """--device as given, once this torch can place a model there: an argparse error naming the value otherwise
    (torch itself raises a RuntimeError for an unknown name and an AssertionError for CUDA on a CPU-only build)."""
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {text!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"got {text!r}, but torch {torch.__version__} has no CUDA device "
                                             "here (torch.cuda.is_available() is False)")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"got {text!r}, but torch sees {torch.cuda.device_count()} CUDA "
                                             "device(s), numbered from 0")
    return text


def spread(rounds: dict[str, list[float]]) -> dict[str, dict]:
    """Per mode, how far its rounds are from its median: a round slowed 20x by a neighbour moves the median
    little and shows here. `iqr_seconds` is the third quartile less the first (inclusive method: within the
    rounds' range; 0 for a single round)."""
    def iqr(values: list[float]) -> float:
        if len(values) < 2:
            return 0.0
        first, _, third = statistics.quantiles(values, n=4, method="inclusive")
        return third - first

    return {
        "min_seconds": {name: round(min(values), 4) for name, values in rounds.items()},
        "iqr_seconds": {name: round(iqr(values), 4) for name, values in rounds.items()},
        "round_seconds": {name: [round(value, 4) for value in values] for name, values in rounds.items()},
    }


# Every ratio in these benchmarks' rows is this estimate; said in each row, as dividing two printed medians
# gives another number under noise.
RATIO_ESTIMATE = ("median of per-round ratios (the modes of a round share its load); not the ratio of two "
                  "median seconds, which differs under noise")


def machine_info(device: str) -> dict[str, object]:
    """What a row was measured on and with, for comparing rows from different runs."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device_name": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(ROOT),
    }


def device_name(device: str) -> str | None:
    """The GPU's name on CUDA; on the CPU its model name where /proc/cpuinfo has one, else platform's."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def git_commit(root: Path) -> str | None:
    """HEAD's commit when `root` is the top of a git checkout; None otherwise (no git, no checkout, no commit,
    a checkout of some folder above it), never an error: the benchmark's numbers matter more."""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2 or not re.fullmatch(r"[0-9a-f]{40,64}", lines[1]):
        return None
    try:
        return lines[1] if Path(lines[0]).resolve() == root.resolve() else None
    except OSError:
        return None
