"""The single-process loop: every mode trains, resume is exact, a run reads its data and checks its settings
before it writes, Ctrl-C or SIGTERM stops it after a step with a checkpoint."""

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from refine.algorithm.rollout import batch_generator
from refine.checkpoints import read_trainer_state
from refine.config import load_config, run_tokenizer
from refine.loop import NONFINITE_KEY, prepare_model, train, train_step
from refine.models import load_model


def _config(tmp_path, mode, steps=2, extra=()):
    return load_config(None, [
        f"train.out_dir={tmp_path}", f"train.mode={mode}", f"train.steps={steps}", "train.batch_size=2",
        "data.seq_len=256", "data.num_documents=8", "refine.num_chunks=2", "model.hidden_size=32",
        "model.intermediate_size=64", "optim.lr=1e-3", *extra,
    ])


# The seconds each mode's steps report per stage, beside the whole step's.
STAGES = {
    "ntp": {"forward", "backward_step"},
    "onepass": {"rollout", "forward", "backward_step"},
    "reference": {"rollout", "forward", "backward_step"},
    "fused": {"forward", "select", "states", "decode", "teacher_forced", "score", "backward_step"},
}


@pytest.mark.parametrize("mode", sorted(STAGES))
def test_every_mode_writes_a_run_directory(tmp_path, mode):
    stats = train(_config(tmp_path, mode), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for row in rows:
        stages = {key.removesuffix("_seconds"): value for key, value in row.items()
                  if key.endswith("_seconds") and key != "step_seconds"}
        assert set(stages) == STAGES[mode]
        assert all(value > 0 for value in stages.values()) and sum(stages.values()) <= row["step_seconds"]
    assert (tmp_path / "checkpoints/latest/model/model.safetensors").exists()
    assert (tmp_path / "losses.png").stat().st_size > 1000
    if mode != "ntp":
        assert "reward_mean" in stats and (tmp_path / "reward.png").exists()


@pytest.mark.parametrize("mode", ["onepass", "fused"])
def test_a_kl_coefficient_trains_against_the_frozen_initial_policy(tmp_path, mode):
    train(_config(tmp_path, mode, steps=3, extra=("refine.kl_coef=0.5",)), progress=False)
    kl = [json.loads(line)["pg/kl_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Step 1's policy is the reference itself; after an update the two differ, and the KL says so.
    assert kl[0] == pytest.approx(0.0, abs=1e-12) and kl[1] > 1e-9 and kl[2] > 1e-9


@pytest.mark.parametrize("mode", ["onepass", "fused"])
def test_resume_continues_exactly(tmp_path, mode):
    """fused draws its positions and rollouts from the run's generator, restored from the checkpoint; onepass from
    each batch's own stream."""
    straight = train(_config(tmp_path / "a", mode, steps=4), progress=False)
    train(_config(tmp_path / "b", mode, steps=2), progress=False)
    resumed = train(_config(tmp_path / "b", mode, steps=4), resume=True, progress=False)
    assert resumed["step"] == 4
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-6)
    assert resumed["reward_mean"] == pytest.approx(straight["reward_mean"], rel=1e-6)


def test_a_resume_across_passes_samples_each_batch_from_its_own_stream(tmp_path):
    """Onepass rollouts come from each batch's stream (its seed, pass and cursor), as a service's workers draw
    them: a resume after the stream wrapped counts its passes from the checkpoint and goes on exactly."""
    wraps = ("data.num_documents=4",)  # two batches a pass
    train(_config(tmp_path / "a", "onepass", steps=5, extra=wraps), progress=False)
    train(_config(tmp_path / "b", "onepass", steps=3, extra=wraps), progress=False)  # stops in the second pass
    train(_config(tmp_path / "b", "onepass", steps=5, extra=wraps), resume=True, progress=False)
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("a", "b")}
    assert [row["data_epoch"] for row in rows["a"]] == [0, 1, 1, 2, 2]
    assert rows["b"] == [row | {key: rows["b"][i][key] for key in row if key.endswith("seconds")}
                         for i, row in enumerate(rows["a"])]


def test_bfloat16_runs_train_on_float32_masters_and_resume_exactly(tmp_path):
    bf16 = ("train.dtype=bfloat16", "optim.lr=1e-5")
    straight = train(_config(tmp_path / "a", "ntp", steps=4, extra=bf16), progress=False)
    train(_config(tmp_path / "b", "ntp", steps=2, extra=bf16), progress=False)
    resumed = train(_config(tmp_path / "b", "ntp", steps=4, extra=bf16), resume=True, progress=False)
    assert resumed["loss"] == straight["loss"]
    a, b = (load_model(tmp_path / run / "checkpoints/latest/model") for run in ("a", "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # At lr 1e-5 a bfloat16 AdamW moves 15% of these weights in 4 steps (the rest round back); the masters 42%.
    start = prepare_model(_config(tmp_path / "c", "ntp", extra=bf16)).state_dict()  # the runs' initial weights
    changed = sum(int((a.state_dict()[name] != tensor).sum()) for name, tensor in start.items())
    assert changed > 0.3 * sum(tensor.numel() for tensor in start.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode,dtype", [("ntp", "float32"), ("onepass", "float32"), ("fused", "float32"),
                                        ("reference", "float32"), ("fused", "bfloat16")])
def test_every_mode_trains_on_cuda(tmp_path, mode, dtype):
    config = _config(tmp_path, mode, steps=3, extra=("train.device=cuda", f"train.dtype={dtype}"))
    stats = train(config, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert stats["skipped_steps"] == 0
    if mode != "ntp":
        assert torch.isfinite(torch.tensor(stats["reward_mean"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"train\.device='cuda', but this machine has no CUDA GPU .* train\.device=cpu"):
        prepare_model(_config(tmp_path, "ntp", extra=("train.device=cuda",)))


def test_a_resume_over_a_changed_source_says_so(tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(6)))
    config = _config(tmp_path / "run", "ntp", steps=1, extra=(f"data.source={source}",))
    train(config, progress=False)
    train(_config(tmp_path / "run", "ntp", steps=2, extra=(f"data.source={source}",)), resume=True, progress=False)
    assert "changed since this run started" not in capsys.readouterr().err
    with source.open("a") as handle:  # documents appended: the same cursor now counts other records
        handle.write(json.dumps({"text": "a late addition " * 20}) + "\n")
    train(_config(tmp_path / "run", "ntp", steps=3, extra=(f"data.source={source}",)), resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"data.source={str(source)!r} changed since this run started (1 files added, removed or resized, " \
           f"e.g. 'docs.jsonl')" in err


def test_the_heldout_loss_is_measured_every_eval_every_steps_and_at_the_last(tmp_path):
    from refine.evaluation.heldout import heldout_documents, heldout_ntp_loss

    config = _config(tmp_path, "onepass", steps=5, extra=("data.eval_source=synthetic", "data.eval_documents=3",
                                                          "train.eval_every=2", "train.log_every=3"))
    train(config, progress=False)
    rows = _rows(tmp_path)
    # Rows every 3 steps and at the last, and at the steps that measured the held-out loss (2, 4, 5).
    assert [row["step"] for row in rows] == [2, 3, 4, 5]
    assert [row["step"] for row in rows if "eval_ntp_loss" in row] == [2, 4, 5]
    assert [row["step"] for row in rows if row.get("eval_seconds", 0) > 0] == [2, 4, 5]  # the measure's own time
    model = load_model(tmp_path / "checkpoints/latest/model")
    documents = heldout_documents(config, run_tokenizer(config))
    assert rows[-1]["eval_ntp_loss"] == pytest.approx(heldout_ntp_loss(model, documents, 2), rel=1e-6)
    assert (tmp_path / "losses.png").exists()


def test_a_bad_eval_source_fails_before_the_run_directory_is_written(tmp_path):
    with pytest.raises(ValueError, match="data.eval_source="):
        train(_config(tmp_path / "run", "ntp", extra=(f"data.eval_source={tmp_path / 'missing.jsonl'}",)),
              progress=False)
    assert not (tmp_path / "run").exists()


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_steps_train_at_the_scheduled_learning_rate_and_a_resume_continues_the_schedule(tmp_path, monkeypatch):
    schedule = ("optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=cosine", "optim.min_lr_ratio=0.1")
    train(_config(tmp_path / "a", "onepass", steps=5, extra=schedule), progress=False)
    rows = _rows(tmp_path / "a")
    assert [row["lr"] for row in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 7.75e-4, 3.25e-4])
    # Step 1 trained at 5e-4: step 2's loss (before its own update) is that of a run at a constant 5e-4, not 1e-3.
    for name, lr in (("half", 5e-4), ("full", 1e-3)):
        train(_config(tmp_path / name, "onepass", steps=2, extra=(f"optim.lr={lr}",)), progress=False)
    assert _rows(tmp_path / "half")[1]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-9)
    assert _rows(tmp_path / "full")[1]["loss"] != pytest.approx(rows[1]["loss"], rel=1e-6)
    # A run of the same settings stopped after step 3 (its checkpoint) resumes at step 4's rate: the rate is a
    # function of the step, with no scheduler state to save.
    steps_taken = []
    original = train_step

    def stop_at_step_4(*args, **kwargs):
        steps_taken.append(1)
        if len(steps_taken) == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    config = _config(tmp_path / "b", "onepass", steps=5, extra=(*schedule, "train.checkpoint_every=3"))
    monkeypatch.setattr("refine.loop.train_step", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    monkeypatch.undo()
    train(config, resume=True, progress=False)
    resumed = _rows(tmp_path / "b")
    assert [row["lr"] for row in resumed] == [row["lr"] for row in rows]
    assert [row["loss"] for row in resumed] == pytest.approx([row["loss"] for row in rows], rel=1e-6)


def _long_documents(tmp_path):
    """Three documents of 600 to 800 byte tokens: three windows each at data.seq_len=256, the first batch of
    two ending inside the first document."""
    source = tmp_path / "long.jsonl"
    source.write_text("".join(json.dumps({"text": f"record {i}: " + "lorem ipsum dolor sit amet " * (22 + 3 * i)})
                              + "\n" for i in range(3)))
    return source


def test_a_run_over_long_documents_trains_every_window_and_resumes_exactly_inside_a_document(tmp_path):
    windows = (f"data.source={_long_documents(tmp_path)}", "data.max_windows=3", "data.min_length=64")
    straight = train(_config(tmp_path / "a", "onepass", steps=4, extra=windows), progress=False)
    train(_config(tmp_path / "b", "onepass", steps=1, extra=windows), progress=False)  # stops inside a document
    resumed = train(_config(tmp_path / "b", "onepass", steps=4, extra=windows), resume=True, progress=False)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("a", "b")}
    assert [row["loss"] for row in rows["b"]] == pytest.approx([row["loss"] for row in rows["a"]], rel=1e-6)
    # With BOS the documents are 605, 686 and 767 tokens: windows 256 256 93 | 256 256 174 | 256 256 255.
    assert [row["tokens"] for row in rows["a"]] == [256 + 256, 93 + 256, 256 + 174, 256 + 256]
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-6)


def test_a_resume_with_other_windows_than_the_run_counts_in_is_refused_before_anything_changes(tmp_path):
    source = _long_documents(tmp_path)
    run = tmp_path / "run"
    train(_config(run, "ntp", steps=1, extra=(f"data.source={source}", "data.max_windows=3")), progress=False)
    before = _run_files(run)
    with pytest.raises(ValueError, match="counts windows of data.max_windows=3 x data.seq_len=256 .*, this resume "
                                         "has data.max_windows=2 x data.seq_len=256"):
        train(_config(run, "ntp", steps=2, extra=(f"data.source={source}", "data.max_windows=2")), resume=True,
              progress=False)
    assert _run_files(run) == before


def test_a_shuffled_run_resumes_exactly_across_passes_and_refuses_a_resume_in_source_order(tmp_path):
    shuffled = (f"data.source={_long_documents(tmp_path)}", "data.max_windows=3", "data.min_length=64",
                "data.shuffle=true")
    straight = tmp_path / "a"
    train(_config(straight, "ntp", steps=6, extra=shuffled), progress=False)  # 9 windows a pass: two passes
    in_order = tmp_path / "in_order"
    train(_config(in_order, "ntp", steps=6, extra=shuffled[:-1]), progress=False)
    chained = tmp_path / "b"
    for steps in (1, 5, 6):  # stops inside a document, then in the second pass (step 5 ends at its 10th window)
        train(_config(chained, "ntp", steps=steps, extra=shuffled), resume=steps > 1, progress=False)
    rows = {run.name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (straight, in_order, chained)}
    assert [row["tokens"] for row in rows["b"]] == [row["tokens"] for row in rows["a"]]
    assert [row["loss"] for row in rows["b"]] == pytest.approx([row["loss"] for row in rows["a"]], rel=1e-6)
    assert [row["tokens"] for row in rows["a"]] != [row["tokens"] for row in rows["in_order"]]
    before = _run_files(chained)
    with pytest.raises(ValueError, match="counts records in the order of data.shuffle=true with train.seed=0"):
        train(_config(chained, "ntp", steps=8, extra=shuffled[:-1]), resume=True, progress=False)
    assert _run_files(chained) == before


def _run_files(out_dir):
    return {path.name: path.read_bytes() for path in out_dir.iterdir() if path.is_file()}


BAD_RESUMES = {
    "architecture": ("model.hidden_size=64",),
    "data source": ("data.source=/nonexistent/docs.jsonl",),
    "cuda": pytest.param(("train.device=cuda",), marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                          reason="needs a machine without a GPU")),
}


@pytest.mark.parametrize("extra", BAD_RESUMES.values(), ids=BAD_RESUMES.keys())
def test_a_run_that_cannot_start_leaves_its_directory_as_it_was(tmp_path, extra):
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    before = _run_files(tmp_path)
    assert {"config.yaml", "metrics.jsonl"} <= set(before)
    with pytest.raises((ValueError, FileNotFoundError)):
        train(_config(tmp_path, "ntp", steps=2, extra=extra), resume=True, progress=False)
    assert _run_files(tmp_path) == before
    # The run's own settings still resume it.
    assert train(_config(tmp_path, "ntp", steps=2), resume=True, progress=False)["step"] == 2


def test_a_missing_or_unreadable_source_is_named_by_its_field(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match=rf"^data.source='{missing}': data path '{missing}' does not exist"):
        train(_config(tmp_path / "run", "ntp", extra=(f"data.source={missing}",)), progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"^data.source='.*empty.jsonl': "):
        train(_config(tmp_path / "run", "ntp", extra=(f"data.source={tmp_path / 'empty.jsonl'}",)), progress=False)


def _write_reward_module(directory, module, reward, value):
    (directory / f"{module}.py").write_text(
        "import torch\n"
        "from refine.algorithm.rewards import register_reward\n\n"
        f"register_reward({reward!r})(lambda inputs: torch.full((inputs.num_rollouts,), {value!r}))\n"
    )


@pytest.mark.parametrize("reward, error", [
    ("nope", r"refine.reward='nope' is not a registered reward; registered: \[.*'cosine'"),
    ("qa_f1", r"refine.reward='qa_f1' scores decoded text, which only the reward replicas of "
              r"service.mode='disaggregated' produce"),
])
def test_a_reward_the_loop_cannot_score_fails_before_anything_trains(tmp_path, reward, error):
    with pytest.raises(ValueError, match=error):
        train(_config(tmp_path / "run", "onepass", extra=(f"refine.reward={reward}",)), progress=False)
    assert not (tmp_path / "run").exists()
    # An NTP run scores nothing: the main job's NTP stages inherit the REFINE branch's reward.
    train(_config(tmp_path / "ntp", "ntp", steps=1, extra=("refine.reward=qa_f1",)), progress=False)


def test_a_custom_reward_from_the_runs_reward_modules_trains(tmp_path, monkeypatch):
    import sys

    from refine.algorithm.rewards import unregister_reward

    _write_reward_module(tmp_path, "scratch_loop_rewards", "test_loop_plugin", 0.25)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        stats = train(_config(tmp_path / "run", "onepass", steps=1, extra=(
            "refine.reward=test_loop_plugin", "refine.reward_modules=[scratch_loop_rewards]")), progress=False)
        assert stats["reward_mean"] == 0.25 and stats["reward_std"] == 0.0
    finally:
        unregister_reward("test_loop_plugin")
        sys.modules.pop("scratch_loop_rewards", None)


def test_a_skipped_steps_metrics_row_is_strict_json(tmp_path):
    """An infinite loss was written as Infinity, which strict JSON readers (jq, browsers, pandas' default) refuse:
    the row leaves such stats out and names them, as the service's learner does."""
    with pytest.raises(ValueError, match=r"^steps 1..1 were all skipped for a non-finite loss or gradient"):
        train(_config(tmp_path, "onepass", steps=1, extra=("refine.lambda_ntp=1e300",)), progress=False)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1], parse_constant=refuse)
    assert row["skipped_steps"] == 1 and row["skipped_nonfinite"] == 1.0 and "loss" not in row
    assert "loss" in row[NONFINITE_KEY].split(",")


def test_a_run_with_skipped_steps_warns_when_it_ends(tmp_path, capsys):
    # Step 1 trains; the resumed steps 2 and 3 are skipped (a run whose every step is skipped ends with an error).
    train(_config(tmp_path, "onepass", steps=1), progress=False)
    train(_config(tmp_path, "onepass", steps=3, extra=("refine.lambda_ntp=1e300",)), resume=True, progress=False)
    assert ("warning: 2 of steps 2..3 skipped an update for a non-finite loss or gradient (skipped_nonfinite in "
            "metrics.jsonl; optim.lr=0.001)") in capsys.readouterr().err


def test_a_warm_up_longer_than_the_run_is_warned_about(tmp_path, capsys):
    train(_config(tmp_path, "ntp", steps=2, extra=("optim.warmup_steps=8",)), progress=False)
    assert ("warning: optim.warmup_steps=8 is more than train.steps=2: the learning rate rises to 0.00025 only, "
            "never optim.lr=0.001") in capsys.readouterr().err
    train(_config(tmp_path, "ntp", steps=2, extra=("optim.warmup_steps=2",)), progress=False)
    assert "warmup_steps" not in capsys.readouterr().err


def test_a_resume_whose_settings_change_the_learning_rate_says_so(tmp_path, capsys):
    cosine = ("optim.schedule=cosine", "optim.min_lr_ratio=0.1")
    train(_config(tmp_path, "ntp", steps=2, extra=cosine), progress=False)
    capsys.readouterr()
    train(_config(tmp_path, "ntp", steps=3, extra=cosine), resume=True, progress=False)  # the rate at step 2 rises
    err = capsys.readouterr().err
    assert ("warning: the learning rate changes at this resume: step 2 trained at 0.00055, where this resume's settings "
            "(optim.lr=0.001, optim.warmup_steps=0, optim.schedule='cosine', optim.min_lr_ratio=0.1, train.steps=3) "
            "give 0.000775; step 3 trains at 0.000325") in err
    # The same settings continue the schedule (a run stopped at any step): nothing to say.
    from refine.loop import rate_change_warning

    whole = tmp_path / "whole"
    train(_config(whole, "ntp", steps=4, extra=cosine), progress=False)
    for step in range(5):
        assert rate_change_warning(_config(whole, "ntp", steps=4, extra=cosine), whole / "metrics.jsonl", step) is None
    assert "step 4 trained at 0.000231802, where this resume's settings" in rate_change_warning(
        _config(whole, "ntp", steps=6, extra=cosine), whole / "metrics.jsonl", 4)  # a longer run: higher
    # A warm-up added afterwards changes only the first steps' rates: still said, naming the last that differs.
    flat = tmp_path / "flat"
    train(_config(flat, "ntp", steps=4), progress=False)
    assert "step 1 trained at 0.001, where this resume's settings (optim.lr=0.001, optim.warmup_steps=2, " \
           "optim.schedule='constant', train.steps=6) give 0.0005; step 5 trains at 0.001" in \
        rate_change_warning(_config(flat, "ntp", steps=6, extra=("optim.warmup_steps=2",)), flat / "metrics.jsonl", 4)
    # Nor for a constant rate over a longer run.
    train(_config(tmp_path / "constant", "ntp", steps=1), progress=False)
    train(_config(tmp_path / "constant", "ntp", steps=2), resume=True, progress=False)
    assert "learning rate changes" not in capsys.readouterr().err


def _signalled_at(monkeypatch, step, signals):
    """train_step, sending this process `signals` during step `step` (as Ctrl-C or `kill` would, mid-step)."""
    import refine.loop as loop

    real, taken = loop.train_step, []

    def step_and_signal(*args, **kwargs):
        taken.append(1)
        result = real(*args, **kwargs)
        if len(taken) == step:
            for number in signals:
                os.kill(os.getpid(), number)
        return result

    monkeypatch.setattr(loop, "train_step", step_and_signal)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_after_the_step_with_a_checkpoint_and_the_printed_command_resumes_it(
        tmp_path, monkeypatch, capfd, ctrl_c, number):
    from refine.cli import main
    from refine.loop import RunInterrupted

    straight = train(_config(tmp_path / "straight", "onepass", steps=4), progress=False)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _signalled_at(monkeypatch, 2, [number])
    with pytest.raises(RunInterrupted):
        train(_config(tmp_path / "run", "onepass", steps=4, extra=("train.log_every=3",)), progress=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert read_trainer_state(tmp_path / "run" / "checkpoints" / "latest" / "trainer.pt")["step"] == 2
    assert [row["step"] for row in _rows(tmp_path / "run")] == [2]  # log_every=3, but the stop's step is a last
    err = capfd.readouterr().err  # the signal handler writes to file descriptor 2 (see stop_requests)
    assert "stopping after the step under way, with a checkpoint (Ctrl-C again to stop at once)" in err
    command = re.search(r"interrupted at step 2 of train\.steps=4; resume with `(.+)`", err).group(1)
    assert command.split()[:2] == ["refine", "train"] and command.split()[-2:] == ["--local", "--resume"]
    monkeypatch.undo()
    assert main(command.split()[1:] + ["--no-progress"]) == 0
    assert [row["step"] for row in _rows(tmp_path / "run")] == [2, 3, 4]
    assert _rows(tmp_path / "run")[-1]["loss"] == pytest.approx(straight["loss"], rel=1e-6)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint_naming_the_last_and_the_resume(
        tmp_path, monkeypatch, capfd, ctrl_c):
    from refine.loop import RunInterrupted

    _signalled_at(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(_config(tmp_path, "ntp", steps=4, extra=("train.checkpoint_every=1",)), progress=False)
    assert not isinstance(stopped.value, RunInterrupted)
    assert read_trainer_state(tmp_path / "checkpoints" / "latest" / "trainer.pt")["step"] == 1  # step 2 wrote none
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert re.search(r"killed at once: its last checkpoint holds step 1 of train\.steps=4; resume with "
                     r"`refine train \S+/config\.yaml --local --resume`", capfd.readouterr().err)


def test_a_second_ctrl_c_before_the_first_checkpoint_says_a_resume_starts_at_step_0(
        tmp_path, monkeypatch, capfd, ctrl_c):
    _signalled_at(monkeypatch, 1, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "ntp", steps=4), progress=False)
    assert "killed at once, before its first checkpoint (a resume starts at step 0); resume with `refine train " \
        in capfd.readouterr().err


def test_stop_requests_leave_ignored_signals_and_other_threads_alone(ctrl_c):
    import threading

    from refine.loop import stop_requests

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as `nohup` or a supervisor may set it
    try:
        with stop_requests("test") as stop_requested:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            os.kill(os.getpid(), signal.SIGINT)
            assert stop_requested()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen = []

    def in_a_thread():
        with stop_requests("test") as stop_requested:
            seen.append((signal.getsignal(signal.SIGINT), stop_requested()))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [(signal.default_int_handler, False)]


def test_a_ctrl_c_during_the_last_checkpoint_lets_it_be_written_and_the_run_finish(tmp_path, monkeypatch, ctrl_c):
    # With train.checkpoint_every=0 the last checkpoint is the run's only one: a stop must not lose it.
    import refine.loop as loop

    real = loop.save_run_checkpoint

    def ctrl_c_then_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "save_run_checkpoint", ctrl_c_then_save)
    stats = train(_config(tmp_path, "ntp", steps=3), progress=False)
    assert stats["step"] == 3
    assert read_trainer_state(tmp_path / "checkpoints" / "latest" / "trainer.pt")["step"] == 3
    assert (tmp_path / "losses.png").exists()


def test_a_run_in_a_relative_out_dir_says_where_its_resume_command_runs(tmp_path, monkeypatch, capfd, ctrl_c):
    from refine.cli import main
    from refine.loop import RunInterrupted

    monkeypatch.chdir(tmp_path)
    _signalled_at(monkeypatch, 2, [signal.SIGINT])
    with pytest.raises(RunInterrupted):
        train(_config(Path("runs/r"), "ntp", steps=3), progress=False)
    command = re.search(r"resume with `(.+)`", capfd.readouterr().err).group(1)
    # config.yaml says train.out_dir=runs/r: from another directory the command would start a new run there.
    prefix = f"cd {tmp_path} && "
    assert command.startswith(prefix), command
    monkeypatch.undo()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)  # as the shell's `cd` would
    assert main(command.removeprefix(prefix).split()[1:] + ["--no-progress"]) == 0
    assert [row["step"] for row in _rows(tmp_path / "runs" / "r")] == [1, 2, 3]


@pytest.mark.parametrize("stderr", ["closed", "reader gone"])
def test_a_run_whose_stderr_is_lost_trains_every_step_and_checkpoints(tmp_path, stderr):
    """`2>&-`, or `2>&1 | head`: the progress bar and the notes stop; the run does not."""
    import subprocess
    import sys

    steps = 30  # ~0.1 s each: the bar is still drawing when the reader below goes
    argv = [sys.executable, "-m", "refine.cli", "train", "--local", "--set", "demo=null", "--set", "train.mode=ntp",
            "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=10", "--set", "train.batch_size=1",
            "--set", "data.seq_len=384", "--set", "model.hidden_size=16", "--set", "model.intermediate_size=32",
            "--set", f"train.out_dir={tmp_path}"]
    if stderr == "closed":
        run = subprocess.Popen(["bash", "-c", '"$@" 2>&-', "bash", *argv], stdout=subprocess.PIPE)
    else:
        run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert run.stderr.read(1)  # the bar is up; writes from now on raise BrokenPipeError
        run.stderr.close()
    try:
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out
    assert json.loads(out.splitlines()[-1])["step"] == steps
    assert [row["step"] for row in _rows(tmp_path)] == list(range(1, steps + 1))
    assert read_trainer_state(tmp_path / "checkpoints" / "latest" / "trainer.pt")["step"] == steps


def test_train_refuses_the_main_jobs_config_whose_stages_it_would_not_run(tmp_path):
    """train(load_config("configs/demo.yaml")) trained train.steps at optim.lr, which that config's own checks say
    the main job does not read, ignoring demo.pretrain_steps and demo.pretrain_lr without a word."""
    from refine.config import DEMO_DEFAULTS

    config = load_config(None, [f"train.out_dir={tmp_path}"], defaults=DEMO_DEFAULTS)
    with pytest.raises(ValueError, match=r"the config has a demo section: .* set demo to None \(--set demo=null\)"):
        train(config, progress=False)
    assert not any(tmp_path.iterdir())


def test_train_leaves_the_callers_global_generator_and_thread_count_as_they_were(tmp_path):
    """A notebook's torch.manual_seed was replaced by train.seed (two runs after different seeds drew the same
    numbers), and train.threads stayed set after the call."""
    threads = torch.get_num_threads()
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.rand(3, generator=torch.Generator().manual_seed(seed))
        train(_config(tmp_path / str(seed), "ntp", steps=1, extra=("train.threads=1",)), progress=False)
        draws.append(torch.rand(3))
        assert torch.equal(draws[-1], expected)
    assert not torch.equal(draws[0], draws[1])
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("mode", ["onepass", "reference"])
def test_rollout_modes_sample_each_batch_from_its_own_stream(tmp_path, monkeypatch, mode):
    """onepass and reference runs draw a batch's rollouts from batch_generator(seed, epoch, cursor), as the
    service's rollout workers do, so that a service run at max_staleness=0 trains as this loop does; fused runs
    draw from the run's generator (checked in test_every_mode_writes_a_run_directory's runs)."""
    states = []

    def recording_step(model, optimizer, batch, config, generator, *args):
        states.append(generator.get_state().clone())
        return train_step(model, optimizer, batch, config, generator, *args)

    monkeypatch.setattr("refine.loop.train_step", recording_step)
    config = _config(tmp_path, mode, steps=3, extra=("train.seed=7",))
    train(config, progress=False)
    rows = _rows(tmp_path)
    assert len(states) == len(rows) == 3 and len({bytes(state.numpy()) for state in states}) == 3
    for state, row in zip(states, rows):
        expected = batch_generator(7, row["data_epoch"], row["cursor"], "cpu").get_state()
        assert torch.equal(state, expected), row["step"]
