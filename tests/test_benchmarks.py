"""The step and rollout benchmarks run end to end on tiny inputs and print their JSON fields."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    assert set(row["ntp_breakdown_seconds"]) == {"forward", "backward", "optimizer"}
    assert set(row["onepass_breakdown_seconds"]) == {"rollout_pass", "update_forward", "backward", "optimizer"}
    fused_stages = row["fused_breakdown_seconds"]
    assert set(fused_stages) == {"forward", "select", "states", "decode", "teacher_forced", "score", "backward",
                                 "optimizer"}
    assert all(seconds > 0 for seconds in fused_stages.values()), fused_stages


def test_rollout_benchmark_counts_the_rollout_tokens():
    (row,) = _run("rollout.py", "--lengths", "256", "--samples", "3")
    assert row["rollout_tokens"] == 8 * 5 * 3  # c chunks x k tokens x n samples
    assert set(row["tokens_per_second"]) == {"snapshot", "reprefill", "reprefill_padded"}
    assert row["snapshot_over_reprefill"] > 0 and row["snapshot_over_reprefill_padded"] > 0
