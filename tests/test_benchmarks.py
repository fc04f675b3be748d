"""The step, rollout and kernels benchmarks run end to end on tiny inputs and print their JSON fields."""

import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def _module(script: str):
    """A benchmark script imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, repeats: int = 1) -> list[dict]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--repeats", str(repeats),
                           "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("script, args, error", [
    ("step.py", ["--lengths", "10"], "argument --lengths: must be at least 40 (c = 8 chunks of k = 5-token rollouts"),
    ("rollout.py", ["--lengths", "39"], "argument --lengths: must be at least 40"),
    ("step.py", ["--heads", "3"], "--heads 3 must divide --hidden-size 128"),
    ("micro_batches.py", ["--length", "10"], "data.seq_len=10 is too short for refine.num_chunks=8"),
    ("pipeline.py", ["--seq-len", "10", "--steps", "2"], "data.seq_len=10 is too short for refine.num_chunks=8"),
    # Long enough for the rollouts, too short for the synthetic corpus' recall documents.
    ("pipeline.py", ["--seq-len", "100"], "data.seq_len=100 is too short for the recall documents"),
    ("micro_batches.py", ["--heads", "3"], "--heads 3 must divide --hidden-size 128"),
    ("kernels.py", ["--span-seconds", "nan"], "--span-seconds must be a finite number above 0, got nan"),
    ("kernels.py", ["--span-seconds", "0"], "--span-seconds must be a finite number above 0, got 0.0"),
    # torch raised a RuntimeError for an unknown device and an AssertionError for CUDA on a CPU-only build.
    ("step.py", ["--device", "foo"], "argument --device: must be cpu or cuda[:N], got 'foo'"),
    ("rollout.py", ["--device", "foo"], "argument --device: must be cpu or cuda[:N], got 'foo'"),
    ("step.py", ["--device", "cuda:99"], "argument --device: got 'cuda:99', but torch"),
    ("rollout.py", ["--device", "cuda:99"], "argument --device: got 'cuda:99', but torch"),
    ("micro_batches.py", ["--device", "foo"], "argument --device: must be cpu or cuda[:N], got 'foo'"),
])
def test_settings_a_benchmark_cannot_run_are_one_line_errors(script, args, error):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and error in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that has no CUDA device")
@pytest.mark.parametrize("script", ["step.py", "rollout.py"])
def test_cuda_where_torch_has_none_is_a_one_line_error(script):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", "cuda"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "argument --device: got 'cuda', but torch" in done.stderr and "has no CUDA device" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rollout_benchmark_echoes_the_device_as_given():
    """It printed the model's device, cuda:0 for --device cuda; step.py prints the flag's value."""
    (row,) = _run("rollout.py", "--lengths", "40", "--samples", "1", "--device", "cuda")
    assert row["device"] == "cuda" and row["device_name"] == torch.cuda.get_device_name()


# Tiny runs of three rounds, shared by the tests of their rows' spread, breakdowns and machine.
@pytest.fixture(scope="module")
def step_row() -> dict:
    (row,) = _run("step.py", "--lengths", "40", "--samples", "1", "--hidden-size", "16", repeats=3)
    return row


@pytest.fixture(scope="module")
def rollout_row() -> dict:
    (row,) = _run("rollout.py", "--lengths", "40", "--samples", "1", repeats=3)
    return row


@pytest.mark.parametrize("script, medians", [("step.py", "median_seconds"), ("rollout.py", "seconds")])
def test_step_and_rollout_rows_show_the_spread_of_their_rounds(step_row, rollout_row, script, medians):
    """Only medians were printed: a round 20x slower than the others left no trace in the row."""
    row = step_row if script == "step.py" else rollout_row
    modes = set(row[medians])
    assert set(row["min_seconds"]) == set(row["iqr_seconds"]) == set(row["round_seconds"]) == modes
    for mode in modes:
        rounds = row["round_seconds"][mode]
        assert len(rounds) == row["repeats"] == 3
        assert row["min_seconds"][mode] == min(rounds) <= row[medians][mode] == sorted(rounds)[1]
        assert 0 <= row["iqr_seconds"][mode] <= max(rounds) - min(rounds) + 1e-4
    # Says which ratio it prints: dividing two medians gives another number under noise.
    assert row["ratio_estimate"].startswith("median of per-round ratios")


def test_step_breakdowns_add_up_to_the_median_step(step_row):
    """They were per-stage medians over rounds, which under load did not add up to the median step (0.1149 s
    against 0.2428 s): now the stages of the median step, and its time outside every stage."""
    for mode in ("ntp", "onepass", "fused"):
        stages = step_row[f"{mode}_breakdown_seconds"]
        assert "unstaged" in stages and all(seconds >= 0 for seconds in stages.values()), stages
        # Every printed number is rounded to 0.1 ms.
        assert sum(stages.values()) == pytest.approx(step_row["median_seconds"][mode], abs=5e-5 * (len(stages) + 1))


@pytest.mark.parametrize("rounds, expected", [
    # Round 2 is the median step (2 s). The per-stage medians, a 0.9 and b 1.8, added up to 2.7 s.
    ([1.0, 2.0, 10.0], {"a": 0.1, "b": 1.8, "unstaged": 0.1}),
    # An even count: the median is the mean of the middle two steps (rounds 2 and 4: 2 and 4 s), and so is
    # each stage.
    ([1.0, 2.0, 10.0, 4.0], {"a": 0.55, "b": 2.3, "unstaged": 0.15}),
])
def test_step_breakdown_is_that_of_the_median_step(rounds, expected):
    step = _module("step.py")
    runs = [{"a": 0.9, "b": 0.05}, {"a": 0.1, "b": 1.8}, {"a": 5.0, "b": 5.0}, {"a": 1.0, "b": 2.8}][:len(rounds)]
    got = step.breakdown(rounds, runs)
    assert got == pytest.approx(expected, abs=1e-9)
    assert sum(got.values()) == pytest.approx(statistics.median(rounds), abs=1e-9)


@pytest.mark.parametrize("script", ["step.py", "rollout.py"])
def test_step_and_rollout_rows_name_the_machine_and_the_code(step_row, rollout_row, script):
    row = step_row if script == "step.py" else rollout_row
    assert row["torch"] == torch.__version__ and row["python"] == platform.python_version()
    assert row["platform"] == platform.platform()
    assert row["cpu_count"] == os.cpu_count() and row["threads"] == 1
    assert row["device"] == "cpu" and (row["device_name"] is None or row["device_name"].strip())
    measured = datetime.datetime.strptime(row["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - measured) < datetime.timedelta(hours=1)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True) \
        if shutil.which("git") and (ROOT / ".git").exists() else None
    assert row["git_commit"] == (head.stdout.strip() if head and head.returncode == 0 else None)
    assert row["model"] == ({"hidden_size": 16, "layers": 2, "heads": 2} if script == "step.py"
                            else {"hidden_size": 128, "layers": 2, "heads": 2})


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_none_outside_the_top_of_a_checkout_and_never_an_error(tmp_path, monkeypatch):
    common = _module("common.py")
    top = tmp_path / "checkout"
    (top / "benchmarks").mkdir(parents=True)
    git = ["git", "-C", str(top), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert common.git_commit(top) is None  # no commit yet
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert common.git_commit(top) == head
    assert common.git_commit(top / "benchmarks") is None  # a folder inside someone else's checkout
    assert common.git_commit(tmp_path) is None  # no checkout

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(common.subprocess, "run", no_git)
    assert common.git_commit(top) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_benchmark_prints_every_ratio(dtype):
    (row,) = _run("step.py", "--lengths", "128", "--samples", "2", "--dtype", dtype)
    assert row["dtype"] == dtype and row["num_samples"] == 2
    assert set(row["median_seconds"]) == {"ntp", "onepass", "fused", "reference", "document_pass"}
    for key in ("onepass_over_ntp", "fused_over_ntp", "document_pass_over_ntp", "reference_over_onepass"):
        assert row[key] > 0, key
    # zero_grad is a stage of its own; "unstaged" is the step's time outside every stage.
    assert set(row["ntp_breakdown_seconds"]) == {"forward", "zero_grad", "backward", "optimizer", "unstaged"}
    assert set(row["onepass_breakdown_seconds"]) == {"rollout_pass", "update_forward", "zero_grad", "backward",
                                                     "optimizer", "unstaged"}
    fused_stages = row["fused_breakdown_seconds"]
    assert set(fused_stages) == {"forward", "select", "states", "decode", "teacher_forced", "score", "zero_grad",
                                 "backward", "optimizer", "unstaged"}
    assert row["reference_prefix_layout"] == "own_length"  # says the reference is the least-work layout
    assert all(seconds > 0 for name, seconds in fused_stages.items() if name != "unstaged"), fused_stages


def test_rollout_benchmark_counts_the_rollout_tokens():
    (row,) = _run("rollout.py", "--lengths", "256", "--samples", "3")
    assert row["rollout_tokens"] == 8 * 5 * 3  # c chunks x k tokens x n samples
    assert set(row["tokens_per_second"]) == {"snapshot", "reprefill", "reprefill_padded"}
    assert row["snapshot_over_reprefill"] > 0 and row["snapshot_over_reprefill_padded"] > 0


def test_micro_batches_benchmark_measures_each_count_in_its_own_process_with_the_same_step():
    rows = _run("micro_batches.py", "--length", "128", "--batch", "2", "--micro-batches", "1", "2",
                "--hidden-size", "32")
    assert [row["micro_batches"] for row in rows] == [1, 2]
    assert all(row["memory_measured_as"] == "ru_maxrss_growth" and row["process_peak_rss_bytes"] > 0 for row in rows)
    # Two micro-batches of one document each hold about half the activations of the two documents at once.
    assert rows[0]["saved_for_backward_over_first"] == 1.0
    assert 0.4 < rows[1]["saved_for_backward_over_first"] < 0.6
    assert rows[1]["median_update_seconds"] > 0
    # Gradient accumulation takes the same step: the first update's loss and gradient norm agree to rounding.
    assert rows[1]["first_step_loss"] == pytest.approx(rows[0]["first_step_loss"], rel=1e-5)
    assert rows[1]["first_step_grad_norm"] == pytest.approx(rows[0]["first_step_grad_norm"], rel=1e-5)


def test_saved_for_backward_counts_activations_not_parameters():
    """nn.Linear saves weight.t(), a view of its parameter: counted by storage, parameters are left out."""
    micro_batches = _module("micro_batches.py")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    x = torch.randn(2, 64)
    saved = micro_batches.SavedForBackward({parameter.untyped_storage().data_ptr() for parameter in model.parameters()})
    weight_views = []

    def pack(tensor):
        weight_views.append(tensor.untyped_storage().data_ptr() == model[1].weight.untyped_storage().data_ptr())
        return saved.pack(tensor)

    with torch.autograd.graph.saved_tensors_hooks(pack, saved.unpack):
        loss = model(x).sum()
    assert any(weight_views)  # the second layer saves its weight (for the gradient of its input)
    # The activations: each layer's input, x and the first layer's output, 2 x 64 float32 each.
    assert saved.peak == saved.current == 2 * (2 * 64 * 4)
    loss.backward()
    assert saved.current == 0 and not saved.held


@pytest.mark.parametrize("seq_len, chunk, gated", [
    (32, 32, False),  # one chunk: no loop over chunks, so no state update
    (20, 32, True),  # one chunk, padded
    (100, 24, False),  # 5 chunks, the last one padded, C not a power of two (the UT inverse pads it to 32)
    (64, 16, True),
])
def test_kernel_flop_count_is_the_kernels_own(seq_len, chunk, gated):
    """chunk_forward_flops against torch's FLOP counter on the real kernel's forward."""
    kernels = _module("kernels.py")
    batch, heads, dim = 1, 2, 16
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(batch, seq_len, heads, dim, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, seq_len, heads, dim, generator=gen), dim=-1)
    v = torch.randn(batch, seq_len, heads, dim, generator=gen)
    beta = torch.rand(batch, seq_len, heads, generator=gen)
    g = -F.softplus(torch.randn(batch, seq_len, heads, generator=gen)) if gated else None
    with FlopCounterMode(display=False) as counter:
        kernels.chunk_delta_rule(q, k, v, beta, g, chunk_size=chunk)
    # The counter misses in-place baddbmm_: in the loop over chunks (ChunkRecurrence.forward) the update of
    # u, 2CKV per chunk, and with a gate the state update too (without one it is baddbmm(out=), counted).
    num_chunks = -(-seq_len // chunk)
    missed = 0 if num_chunks == 1 else batch * heads * num_chunks * 2 * chunk * dim * dim * (2 if gated else 1)
    assert kernels.chunk_forward_flops(batch, seq_len, heads, dim, dim, chunk) == counter.get_total_flops() + missed


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


class CallClock:
    """A perf_counter that moves only when the fake call runs, by that call's known duration: the loop's
    arithmetic can then be checked exactly. The durations differ, so the rate over the span (total calls
    over total time) differs from any one call's rate."""

    DURATIONS = (0.5, 0.25, 0.125, 0.125, 0.5, 0.25)  # seconds; ends at 0.5, 0.75, 0.875, 1.0, 1.5, 1.75

    def __init__(self) -> None:
        self.now = 50.0
        self.durations = iter(self.DURATIONS)

    def __call__(self) -> float:
        return self.now

    def call(self) -> None:
        self.now += next(self.durations)


@pytest.mark.parametrize("span, calls_needed, elapsed", [
    (1.0, 4, 1.0),  # the span ends exactly after call 4: the loop stops on reaching it (elapsed >= span)
    (1.2, 5, 1.5),  # it ends inside call 5: that call counts, and so does its whole time
    (0.1, 1, 0.5),  # a span shorter than one call: that one call is the measurement
])
def test_kernel_reference_rate_spans_many_calls(monkeypatch, span, calls_needed, elapsed):
    """A matmul reference rate is measured over a span of back-to-back calls, not one call: calls repeat
    until `span` seconds have passed, and the rate is flops x calls over the time they took."""
    kernels = _module("kernels.py")
    clock = CallClock()
    monkeypatch.setattr(kernels, "time", SimpleNamespace(perf_counter=clock))  # this module's clock only
    starts = []

    def fn():
        starts.append(clock())
        clock.call()

    flops = 3 * 10**9
    rate = kernels.span_gflops(fn, flops, span=span)
    assert len(starts) == calls_needed
    assert rate == pytest.approx(flops * calls_needed / elapsed / 1e9, rel=1e-12)


def test_kernels_benchmark_interleaves_its_reference():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--quick", "--lengths", "128",
                           "--threads", "1", "--span-seconds", "0.02"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    large, row = [json.loads(line) for line in done.stdout.splitlines()]
    assert large["what"] == "matmul_large" and large["gflops"] > 0
    assert row["span_seconds"] == 0.02 and row["matmul_batched_gflops"] > 0 and row["ratio_vs_batched"] > 0


def test_data_order_benchmark_reads_every_record_both_ways_for_each_format():
    rows = _run("data_order.py", "--records", "300", "--chars", "200", "--row-group", "40")
    assert [row["format"] for row in rows] == ["jsonl", "parquet"]
    for row in rows:
        assert row["records"] == 300 and row["file_bytes"] > 300 * 200 and row["index_seconds"] >= 0
        assert all(row[f"{kind}_{order}_per_second"] > 0 for kind in ("records", "documents")
                   for order in ("in_order", "shuffled"))
        assert row["records_shuffled_over_in_order"] == pytest.approx(
            row["records_shuffled_per_second"] / row["records_in_order_per_second"], rel=0.5)


def test_a_stopped_benchmark_removes_its_temporary_files(tmp_path):
    """SIGTERM ended a benchmark before its cleanup ran (the refine command turns it into Ctrl-C, the scripts did
    not): data_order.py left its 165 MB corpus folder, pipeline.py its run and Redis folders, micro_batches.py a
    child process measuring on."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "data_order.py"), "--records", "2000",
                                "--chars", "100", "--repeats", "1000", "--threads", "1"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(tmp_path.iterdir()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, process.stderr.read()
    time.sleep(1.0)  # into its measuring
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert list(tmp_path.iterdir()) == []
