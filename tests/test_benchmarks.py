"""The step, rollout and kernels benchmarks run end to end on tiny inputs and print their JSON fields."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(script: str):
    """A benchmark script imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--repeats", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_benchmark_prints_every_ratio(dtype):
    (row,) = _run("step.py", "--lengths", "128", "--samples", "2", "--dtype", dtype)
    assert row["dtype"] == dtype and row["num_samples"] == 2
    assert set(row["median_seconds"]) == {"ntp", "onepass", "fused", "reference", "document_pass"}
    for key in ("onepass_over_ntp", "fused_over_ntp", "document_pass_over_ntp", "reference_over_onepass"):
        assert row[key] > 0, key
    # zero_grad is a stage of its own, so a mode's stages add up to its step.
    assert set(row["ntp_breakdown_seconds"]) == {"forward", "zero_grad", "backward", "optimizer"}
    assert set(row["onepass_breakdown_seconds"]) == {"rollout_pass", "update_forward", "zero_grad", "backward",
                                                     "optimizer"}
    fused_stages = row["fused_breakdown_seconds"]
    assert set(fused_stages) == {"forward", "select", "states", "decode", "teacher_forced", "score", "zero_grad",
                                 "backward", "optimizer"}
    assert row["reference_prefix_layout"] == "own_length"  # says the reference is the least-work layout
    assert all(seconds > 0 for seconds in fused_stages.values()), fused_stages


def test_rollout_benchmark_counts_the_rollout_tokens():
    (row,) = _run("rollout.py", "--lengths", "256", "--samples", "3")
    assert row["rollout_tokens"] == 8 * 5 * 3  # c chunks x k tokens x n samples
    assert set(row["tokens_per_second"]) == {"snapshot", "reprefill", "reprefill_padded"}
    assert row["snapshot_over_reprefill"] > 0 and row["snapshot_over_reprefill_padded"] > 0


def test_step_breakdown_covers_the_timed_steps_only():
    """Every round runs each mode twice, an untimed warm-up then the timed step; the stages come from
    the timed steps only, one record per round, never added up over both."""
    step = _module("step.py")
    calls = []

    def mode(times):
        calls.append(times is not None)
        if times is not None:
            with times.stage("work"):
                pass

    seconds, stages = step.time_rounds({"a": mode, "b": mode}, repeats=3, device="cpu")
    assert calls == [False, True] * 6
    assert len(seconds["a"]) == len(stages["a"]) == 3
    assert all(set(run) == {"work"} for run in stages["a"] + stages["b"])


def test_rollout_benchmark_labels_the_padded_layout():
    (row,) = _run("rollout.py", "--lengths", "128", "--samples", "1")
    assert "mixers over the real tokens only" in row["reprefill_padded_layout"]


def test_kernel_reference_rate_spans_many_calls():
    """A matmul reference rate is measured over a span of back-to-back calls, not one call."""
    kernels = _module("kernels.py")
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    rate = kernels.span_gflops(fn, 10**9, span=0.03)
    assert len(calls) >= 5  # not a single call
    assert 0 < rate <= len(calls) / 0.03  # 1 GFLOP per call over at least the span


def test_kernels_benchmark_interleaves_its_reference():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--quick", "--lengths", "128",
                           "--threads", "1", "--span-seconds", "0.02"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    large, row = [json.loads(line) for line in done.stdout.splitlines()]
    assert large["what"] == "matmul_large" and large["gflops"] > 0
    assert row["span_seconds"] == 0.02 and row["matmul_batched_gflops"] > 0 and row["ratio_vs_batched"] > 0
