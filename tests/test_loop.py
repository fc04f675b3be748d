"""The single-process loop: every mode trains, runs write their directory, resume is exact, bad steps skip."""

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import LossResult, advantages_for, refine_loss, score_rollouts
from refine.config import ConfigError, load_config
from refine.algorithm.losses import ntp_loss
from refine.config import run_tokenizer
from refine.data.batches import DocumentBatch
from refine.loop import (
    MAX_SKIPPED_IN_A_ROW, NONFINITE_KEY, RunPosition, StepResult, make_optimizer, merge_steps, mini_batch_bounds,
    optimizer_step, prepare_model, latest_checkpoint, read_trainer_state, resume_from, rollout_batch_update,
    save_run_checkpoint, start_run_directory, step_checkpoints, train, train_step,
)
from refine.models import build_model, load_model


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


def test_resume_continues_exactly(tmp_path):
    straight = train(_config(tmp_path / "a", "onepass", steps=4), progress=False)
    train(_config(tmp_path / "b", "onepass", steps=2), progress=False)
    resumed = train(_config(tmp_path / "b", "onepass", steps=4), resume=True, progress=False)
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


def test_resume_without_a_checkpoint_says_it_starts_over(tmp_path, capsys):
    stats = train(_config(tmp_path, "ntp", steps=1), resume=True, progress=False)
    assert stats["step"] == 1
    assert f"no checkpoint at {tmp_path / 'checkpoints' / 'latest'} to resume from" in capsys.readouterr().err


def test_a_resume_with_nothing_left_to_train_says_so_and_leaves_the_run_as_it_was(tmp_path, capsys):
    train(_config(tmp_path, "ntp", steps=2), progress=False)
    before = {name: (tmp_path / name).read_text() for name in ("config.yaml", "metrics.jsonl")}
    stats = train(_config(tmp_path, "ntp", steps=1), resume=True, progress=False)
    assert stats["step"] == 2 and stats == json.loads(before["metrics.jsonl"].splitlines()[-1])
    assert f"nothing to train: the checkpoint in {tmp_path} is at step 2, train.steps=1" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_text() for name in before} == before  # config.yaml still says 2 steps


def test_non_finite_steps_are_skipped_and_counted():
    model = build_model(dict(model_type="delta_net", hidden_size=16, num_heads=2, num_hidden_layers=1, vocab_size=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    bad = model.lm_head.weight.sum() * float("nan")
    outcome = optimizer_step(model, optimizer, LossResult(bad, bad, bad, {}), grad_clip=1.0)
    assert outcome.skipped and outcome.stats["skipped_nonfinite"] == 1.0
    # A finite loss whose gradient is not finite is skipped too.
    hook = model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))
    finite = model(torch.tensor([[1, 2, 3]])).logits.square().mean()
    assert torch.isfinite(finite)
    outcome = optimizer_step(model, optimizer, LossResult(finite, finite, finite, {}), grad_clip=1.0)
    hook.remove()
    assert outcome.skipped and outcome.stats["skipped_nonfinite"] == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


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


def test_checkpoints_carry_the_runs_tokenizer(tmp_path):
    from test_tokenizer import write_bpe_tokenizer

    from refine.tokenizer import load_tokenizer, resolve_tokenizer

    write_bpe_tokenizer(tmp_path / "tok")
    train(_config(tmp_path / "run", "ntp", steps=1, extra=(f"tokenizer={tmp_path / 'tok'}", "model.vocab_size=320")),
          progress=False)
    model_dir = tmp_path / "run" / "checkpoints" / "latest" / "model"
    # What `refine eval --model` picks without --tokenizer: the run's tokenizer, not the byte fallback.
    found, original = resolve_tokenizer(None, model_dir), load_tokenizer(tmp_path / "tok")
    text = "a document about fast weights"
    assert found.vocab_size == original.vocab_size == 320
    assert found.encode(text) == original.encode(text) and found.eos_id == original.eos_id
    # The model built from scratch took the tokenizer's special ids (no pad token: the model names none).
    saved = load_model(model_dir).config
    assert (saved.bos_token_id, saved.eos_token_id, saved.pad_token_id) == (original.bos_id, original.eos_id, None)


def test_a_resume_refuses_a_tokenizer_other_than_the_checkpoints(tmp_path):
    from test_tokenizer import write_bpe_tokenizer

    write_bpe_tokenizer(tmp_path / "tok")
    config = _config(tmp_path / "run", "ntp", steps=1, extra=(f"tokenizer={tmp_path / 'tok'}", "model.vocab_size=320"))
    train(config, progress=False)
    # The tokenizer file rewritten since, its size and special tokens unchanged: two tokens trade ids.
    tree = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    vocab = tree["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tree))
    model_dir = tmp_path / "run" / "checkpoints" / "latest" / "model"
    longer = config.model_copy(update={"train": config.train.model_copy(update={"steps": 2})})
    with pytest.raises(ValueError, match=f"--resume: tokenizer '{tmp_path / 'tok'}' is not the one checkpoint "
                                         f"{model_dir.parent} was trained with: resume with the tokenizer saved there "
                                         f"\\(--set tokenizer={model_dir}\\)"):
        train(longer, resume=True, progress=False)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    train(longer.model_copy(update={"tokenizer": str(model_dir)}), resume=True, progress=False)  # the remedy
    # A byte-level run resumed with a tokenizer file is refused alike.
    byte_run = _config(tmp_path / "bytes", "ntp", steps=1, extra=("model.vocab_size=320",))
    train(byte_run, progress=False)
    with pytest.raises(ValueError, match=r"resume with the byte-level tokenizer \(--set tokenizer=byte\)"):
        train(byte_run.model_copy(update={"tokenizer": str(model_dir)}), resume=True, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"train\.device='cuda', but this machine has no CUDA GPU .* train\.device=cpu"):
        prepare_model(_config(tmp_path, "ntp", extra=("train.device=cuda",)))


def test_metrics_rows_are_one_per_step_across_reruns_and_resumes(tmp_path):
    config = _config(tmp_path, "ntp", steps=2)
    train(config, progress=False)
    train(config, progress=False)  # the same command again, without --resume: a fresh run
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # A run killed after logging step 3 but before a checkpoint there resumes from step 2: step 3's row goes.
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 3, "loss": 9.9}) + "\n" + '{"step": 4, "lo')
    train(_config(tmp_path, "ntp", steps=4), resume=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and rows[2]["loss"] != 9.9


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


def _uneven_documents(tmp_path):
    source = tmp_path / "uneven.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i}: " + "words of text " * (8 + 5 * i)}) + "\n"
                              for i in range(8)))
    return source


@pytest.mark.parametrize("mode,mini_batches", [("onepass", 1), ("onepass", 2), ("reference", 1), ("ntp", 2)])
def test_micro_batches_take_the_whole_batchs_update(tmp_path, mode, mini_batches):
    """Gradient accumulation is exact: the same steps (float64, to rounding) as the whole (mini-)batch at once,
    with documents of unequal lengths; the stats are the whole batch's too."""
    common = (f"data.source={_uneven_documents(tmp_path)}", "data.min_length=64", "train.dtype=float64",
              "train.batch_size=4", f"train.mini_batches={mini_batches}")
    for name, micro in (("whole", 1), ("micro", 4 // mini_batches)):
        train(_config(tmp_path / name, mode, steps=3, extra=(*common, f"train.micro_batches={micro}")), progress=False)
    whole, micro = _rows(tmp_path / "whole"), _rows(tmp_path / "micro")
    keys = [key for key in whole[0] if not key.endswith("_seconds") and key in micro[0]]
    assert {"loss", "ntp_loss", "grad_norm"} <= set(keys) and set(whole[0]) - set(micro[0]) == set()
    for before, after in zip(whole, micro):
        assert {key: after[key] for key in keys} == pytest.approx({key: before[key] for key in keys}, rel=1e-9,
                                                                     abs=1e-12)
    a = load_model(tmp_path / "whole" / "checkpoints/latest/model").state_dict()
    b = load_model(tmp_path / "micro" / "checkpoints/latest/model").state_dict()
    assert max(float((a[name] - b[name]).abs().max()) for name in a) < 1e-12


def test_a_non_finite_slice_stops_the_backward_passes_but_not_the_stats():
    """A non-finite slice skips the step; the slices after it still run forward (without gradient), so the row's
    stats are the whole batch's, as an undivided step reports them, not those of the slices before the bad one."""
    from refine.algorithm.update import SliceShares
    from refine.loop import backward_slices

    weight = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    graphs = []

    def loss_of(start: int, end: int):
        loss = weight * start if start != 1 else weight * float("nan")
        graphs.append(torch.is_grad_enabled())
        stats = {"ntp_loss": float(start), "policy_loss": 10.0 * start}
        return LossResult(loss, loss.detach(), loss.detach(), stats), SliceShares(ntp=1 / 3, policy=1 / 3)

    stats, finite = backward_slices([(0, 1), (1, 2), (2, 3)], loss_of, load_config(None, []).refine)
    assert not finite and graphs == [True, True, False]  # the slice after the bad one: forward only
    assert stats["ntp_loss"] == pytest.approx(1.0) and stats["policy_loss"] == pytest.approx(10.0)
    assert float(weight.grad) == 0.0  # slice 0's gradient (0); slice 1 was not backpropagated


def test_micro_batches_are_refused_where_the_step_cannot_take_them(tmp_path):
    with pytest.raises(ValueError, match="train.micro_batches=2 needs train.mode 'onepass', 'reference' or 'ntp'"):
        train(_config(tmp_path, "fused", extra=("train.micro_batches=2",)), progress=False)
    with pytest.raises(ConfigError, match=r"train.micro_batches=2 x train.mini_batches=2 is more than "
                                          r"train.batch_size=2"):
        _config(tmp_path, "onepass", extra=("train.micro_batches=2", "train.mini_batches=2"))


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


def test_kept_checkpoints_are_the_newest_ones_hard_linked_and_a_fresh_run_removes_them(tmp_path):
    run = tmp_path / "run"
    keep = ("train.checkpoint_every=1", "train.keep_checkpoints=2")
    train(_config(run, "ntp", steps=3, extra=keep), progress=False)
    folder = run / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    newest = folder / "step-00000003"
    for file in (folder / "latest").rglob("*"):  # the same files as latest, not copies
        if file.is_file():
            assert (newest / file.relative_to(folder / "latest")).stat().st_ino == file.stat().st_ino
    assert read_trainer_state(folder / "step-00000002" / "trainer.pt")["step"] == 2
    older = load_model(folder / "step-00000002" / "model").state_dict()
    assert any(not torch.equal(older[name], tensor) for name, tensor in load_model(newest / "model").state_dict().items())
    # A resume keeps going; a kept checkpoint keeps its step's files after latest moved on.
    train(_config(run, "ntp", steps=5, extra=keep), resume=True, progress=False)
    assert sorted(path.name for path in folder.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    assert read_trainer_state(folder / "step-00000004" / "trainer.pt")["step"] == 4
    assert read_trainer_state(folder / "latest" / "trainer.pt")["step"] == 5
    train(_config(run, "ntp", steps=4, extra=("train.checkpoint_every=4", "train.keep_checkpoints=0")), progress=False)
    assert sorted(path.name for path in folder.iterdir()) == ["latest"]  # a fresh run: the earlier run's are gone


def test_a_kept_checkpoint_the_disk_refuses_names_it_and_leaves_latest_whole(tmp_path, monkeypatch):
    import errno

    import refine.loop

    def full_disk(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device", destination)

    monkeypatch.setattr(refine.loop, "_link_or_copy", full_disk)
    with pytest.raises(OSError, match=r"cannot keep the step-2 checkpoint as .*step-00000002 \(No space left on "
                                      r"device: .*\): .*latest is intact: `refine train --resume` continues from it"):
        train(_config(tmp_path, "ntp", steps=2, extra=("train.keep_checkpoints=1",)), progress=False)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest"]
    assert read_trainer_state(tmp_path / "checkpoints" / "latest" / "trainer.pt")["step"] == 2


def test_kept_checkpoints_survive_kills_while_keeping_or_pruning_them(tmp_path, monkeypatch):
    import refine.loop

    keep = ("train.checkpoint_every=1", "train.keep_checkpoints=2")
    # Killed after latest moved to step 2, before step 2 was kept: the resumed run's next save keeps it first.
    real_keep = refine.loop.keep_step_checkpoint

    def killed_at_step_2(latest, position, count):
        if position.step == 2:
            raise KeyboardInterrupt
        real_keep(latest, position, count)

    monkeypatch.setattr(refine.loop, "keep_step_checkpoint", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "ntp", steps=3, extra=keep), progress=False)
    monkeypatch.setattr(refine.loop, "keep_step_checkpoint", real_keep)
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["latest", "step-00000001"]
    train(_config(tmp_path, "ntp", steps=3, extra=("train.checkpoint_every=1", "train.keep_checkpoints=3")),
          resume=True, progress=False)
    assert [path.name for path in step_checkpoints(folder)] == ["step-00000001", "step-00000002", "step-00000003"]
    assert read_trainer_state(folder / "step-00000002" / "trainer.pt")["step"] == 2
    # Killed halfway through removing an old one: what is left is no longer under a kept checkpoint's name.
    real_rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):
        if Path(path).name == "step-00000001.removed.partial" and Path(path).exists():
            next(Path(path).rglob("*.safetensors")).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "ntp", steps=4, extra=("train.checkpoint_every=1", "train.keep_checkpoints=3")),
              resume=True, progress=False)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [path.name for path in step_checkpoints(folder)] == ["step-00000002", "step-00000003", "step-00000004"]
    train(_config(tmp_path, "ntp", steps=5, extra=("train.checkpoint_every=1", "train.keep_checkpoints=3")),
          resume=True, progress=False)
    assert sorted(path.name for path in folder.iterdir()) == [
        "latest", "step-00000003", "step-00000004", "step-00000005"]  # the .partial leftover removed too


def test_only_the_runs_own_step_folders_are_kept_checkpoints_in_step_order(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in ("step-best", "step-00000002-best", "step-123456789", "step-00000007", "step-00000003.partial"):
        (folder / name).mkdir(parents=True)
    assert [path.name for path in step_checkpoints(folder)] == ["step-00000007", "step-123456789"]


def test_a_resume_that_finds_kept_checkpoints_but_no_latest_removes_nothing(tmp_path):
    train(_config(tmp_path, "ntp", steps=2, extra=("train.checkpoint_every=1", "train.keep_checkpoints=2")),
          progress=False)
    shutil.rmtree(tmp_path / "checkpoints" / "latest")
    with pytest.raises(ValueError, match=r"--resume: .*latest does not exist, but the kept checkpoints step-00000001, "
                                         r"step-00000002 do; a run starting over would remove them: to continue "
                                         r"from one, rename it to .*checkpoints/latest"):
        train(_config(tmp_path, "ntp", steps=3), resume=True, progress=False)
    assert [path.name for path in step_checkpoints(tmp_path / "checkpoints")] == ["step-00000001", "step-00000002"]


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


def test_resume_into_another_model_names_the_fields_and_both_values(tmp_path):
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    changed = _config(tmp_path, "ntp", steps=2, extra=("model.hidden_size=64", "model.num_hidden_layers=1"))
    with pytest.raises(ValueError, match=r"was saved from another model \(model\.hidden_size=32 in the checkpoint, "
                                         r"64 in this config; model\.num_hidden_layers=2 in the checkpoint, 1 in "
                                         r"this config\)"):
        train(changed, resume=True, progress=False)


DAMAGED_TRAINER = {
    "garbage": lambda good: bytes(range(256)) * 4,
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "not a trainer state": lambda good: _saved([1, 2]),
}


def _saved(value) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", DAMAGED_TRAINER.values(), ids=DAMAGED_TRAINER.keys())
def test_a_damaged_trainer_state_is_one_line_without_torchs_unsafe_advice(tmp_path, damage):
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    trainer = tmp_path / "checkpoints" / "latest" / "trainer.pt"
    trainer.write_bytes(damage(trainer.read_bytes()))
    before = _run_files(tmp_path)
    with pytest.raises(ValueError, match=f"^{trainer}: not a readable training checkpoint \\(") as failure:
        train(_config(tmp_path, "ntp", steps=2), resume=True, progress=False)
    message = str(failure.value)
    assert "\n" not in message and "weights_only" not in message and failure.value.__cause__ is None
    assert _run_files(tmp_path) == before  # config.yaml (steps=1) not replaced by the failed run's (steps=2)


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_an_out_dir_that_cannot_be_a_directory_names_the_field(tmp_path, where):
    (tmp_path / "file").write_text("keep me")
    out_dir = tmp_path / where
    with pytest.raises(ValueError, match=f"^train.out_dir='{out_dir}': cannot create the run directory"):
        train(_config(out_dir, "ntp", steps=1), progress=False)
    assert (tmp_path / "file").read_text() == "keep me"


def test_mini_batch_bounds_cover_the_batch_in_near_equal_contiguous_runs():
    for documents in range(1, 9):
        for count in range(1, documents + 1):
            bounds = mini_batch_bounds(documents, count)
            assert [i for start, end in bounds for i in range(start, end)] == list(range(documents))
            sizes = [end - start for start, end in bounds]
            assert len(sizes) == count and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert mini_batch_bounds(2, 3) == [(0, 1), (1, 2)]  # a short last batch: one document per mini-batch
    with pytest.raises(ValueError, match=r"cannot split 0 documents into train.mini_batches=2"):
        mini_batch_bounds(0, 2)


def _scored_batch():
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=40, hidden_size=32, num_hidden_layers=1, num_heads=2,
                             intermediate_size=32), dtype=torch.float64)
    config = load_config(None, ["train.batch_size=3", "train.mini_batches=2", "optim.lr=0.05", "refine.num_chunks=2",
                                "refine.margin=4", "refine.num_samples=2", "data.min_length=30"])
    ids = torch.randint(0, 40, (3, 90), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([90, 60, 75])
    rollouts = snapshot_rollouts(model, ids, lengths, config.refine, torch.Generator().manual_seed(2))
    rollouts.rewards = score_rollouts(rollouts, config.refine)
    return model, config, ids, lengths, rollouts


@pytest.mark.parametrize("mode", ["onepass", "reference"])
def test_mini_batches_are_optimizer_steps_in_turn_on_the_rollouts_sampled_before_the_first(mode):
    model, config, ids, lengths, rollouts = _scored_batch()
    outcome = rollout_batch_update(mode, model, make_optimizer(model, config.optim), ids, lengths, rollouts, config)

    expected, _, _, _, _ = _scored_batch()
    optimizer = make_optimizer(expected, config.optim)
    advantages = advantages_for(rollouts.rewards, rollouts, config.refine)  # over the whole batch
    by_hand = []
    for (start, end), (lo, hi) in zip([(0, 2), (2, 3)], [(0, 8), (8, 12)]):  # 2 chunks x 2 samples per document
        result = refine_loss(mode, expected, ids[start:end], lengths[start:end], rollouts.documents(start, end),
                             advantages[lo:hi], config.refine)
        by_hand.append(optimizer_step(expected, optimizer, result, config.optim.grad_clip))
    for got, want in zip(model.state_dict().values(), expected.state_dict().values()):
        torch.testing.assert_close(got, want)
    assert outcome.stats["loss"] == pytest.approx((by_hand[0].stats["loss"] + by_hand[1].stats["loss"]) / 2)
    # The first mini-batch is on-policy; the second trains on rollouts of the weights before the first step.
    assert by_hand[0].stats["pg/approx_kl"] == pytest.approx(0.0, abs=1e-12)
    assert abs(by_hand[1].stats["pg/approx_kl"]) > 1e-6
    assert outcome.stats["pg/approx_kl"] == pytest.approx(by_hand[1].stats["pg/approx_kl"] / 2)


def test_a_run_with_mini_batches_trains_and_a_fused_run_refuses_them(tmp_path):
    stats = train(_config(tmp_path / "a", "onepass", extra=("train.mini_batches=2",)), progress=False)
    assert stats["step"] == 2 and "pg/approx_kl" in stats
    with pytest.raises(ValueError, match=r"train.mini_batches=2 needs train.mode 'onepass' or 'reference'.*samples "
                                         r"them in every update"):
        train(_config(tmp_path / "fused", "fused", extra=("train.mini_batches=2",)), progress=False)
    assert not (tmp_path / "fused").exists()  # refused before anything is written


def test_ntp_mini_batches_are_as_many_optimizer_steps_on_runs_of_the_documents(tmp_path):
    """So that the main job's NTP branch takes as many updates as its REFINE branch."""
    config = _config(tmp_path, "ntp", extra=("train.mini_batches=2", "train.batch_size=3"))
    model = prepare_model(config)
    expected = prepare_model(config)
    optimizer, by_hand = make_optimizer(model, config.optim), make_optimizer(expected, config.optim)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    batch = DocumentBatch(ids, torch.tensor([40, 30, 35]), ["a", "b", "c"])
    outcome = train_step(model, optimizer, batch, config, torch.Generator())
    losses = []
    for start, end in [(0, 2), (2, 3)]:  # mini_batch_bounds(3, 2)
        loss = ntp_loss(expected(ids[start:end], lengths=batch.lengths[start:end], output_state=False).logits,
                        ids[start:end], batch.lengths[start:end])
        losses.append(float(loss.detach()))
        optimizer_step(expected, by_hand, LossResult(loss, loss, loss.new_zeros(()), {}), config.optim.grad_clip)
    assert outcome.stats["ntp_loss"] == pytest.approx(sum(losses) / 2)
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    assert optimizer.state_dict()["state"][0]["step"] == 2


def test_merged_steps_average_each_stat_over_the_steps_that_report_it():
    skipped = StepResult({"loss": 5.0, "skipped_nonfinite": 1.0}, True)
    taken = StepResult({"loss": 3.0, "grad_norm": 2.0}, False)
    merged = merge_steps([skipped, taken])
    assert merged.skipped and merged.stats == {"loss": 4.0, "skipped_nonfinite": 0.5, "grad_norm": 2.0}


def test_a_checkpoint_is_replaced_whole_or_not_at_all(tmp_path):
    """A run killed while writing its checkpoint keeps the previous one: new weights beside the old optimizer,
    step and data cursor would resume wrongly without a word."""
    config = _config(tmp_path, "ntp")
    model, tokenizer = prepare_model(config), run_tokenizer(config)
    optimizer, generator = make_optimizer(model, config.optim), torch.Generator()
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(2, 4, 1), generator, tokenizer)
    at_step_2 = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    # Fails after the weights and trainer state of step 3 are written.
    with pytest.raises(OSError, match=r"^cannot save the step-3 checkpoint in .*checkpoints \(No such file or "
                                      r"directory: .*no-such-folder/file'\): its partial files are removed; the earlier "
                                      r"checkpoint .*checkpoints/latest is intact: `refine train --resume` continues"):
        save_run_checkpoint(tmp_path, model, optimizer, RunPosition(3, 6, 1), generator, tokenizer,
                            extra_files={"no-such-folder/file": ""})
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest"]
    resumed = prepare_model(config)
    position = resume_from(tmp_path, True, resumed, make_optimizer(resumed, config.optim), torch.Generator(), "refine",
                           tokenizer)
    assert position == RunPosition(2, 4, 1)  # the step-2 checkpoint, skipped-step count included
    for name, saved in resumed.state_dict().items():
        assert torch.equal(saved, at_step_2[name]), name
    (tmp_path / "checkpoints" / "step-00000003.partial" / "model").mkdir(parents=True)  # what a killed save leaves
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(4, 8, 1), generator, tokenizer)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest"]


def test_a_resume_trains_with_the_configs_optimizer_settings_and_the_checkpoints_moments(tmp_path):
    """config.yaml says what the resumed run trains with: a lower lr given at resume is the one used."""
    train(_config(tmp_path, "ntp", steps=2, extra=("optim.lr=0.01",)), progress=False)
    config = _config(tmp_path, "ntp", steps=3, extra=("optim.lr=1e-5", "optim.weight_decay=0.5"))
    model = prepare_model(config)
    optimizer = make_optimizer(model, config.optim)
    assert resume_from(tmp_path, True, model, optimizer, torch.Generator(), "refine", run_tokenizer(config)).step == 2
    assert {(group["lr"], group["weight_decay"]) for group in optimizer.param_groups} == {(1e-5, 0.5)}
    saved = torch.load(tmp_path / "checkpoints" / "latest" / "trainer.pt", weights_only=True)["optimizer"]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


def test_a_fresh_run_removes_the_earlier_runs_checkpoint(tmp_path, capsys):
    """Else a --resume after the fresh run died before its first checkpoint would continue the earlier run."""
    train(_config(tmp_path, "ntp", steps=2), progress=False)
    capsys.readouterr()
    config = _config(tmp_path, "ntp", steps=1)
    start_run_directory(config, fresh=False, program="refine")
    assert (tmp_path / "checkpoints" / "latest").is_dir()  # a resumed run keeps it
    (tmp_path / "checkpoints" / "step-00000009.partial").mkdir()  # a save the earlier run did not finish
    (tmp_path / "eval-niah.json").write_text("{}")  # refine eval's results for the earlier run's checkpoint
    start_run_directory(config, fresh=True, program="refine")
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert (f"a fresh run in {tmp_path}: removed the earlier run's checkpoints (--resume continues a run); the "
            f"earlier run's eval results stay (eval-niah.json): they score its checkpoints, not this run's"
            ) in capsys.readouterr().err
    assert (tmp_path / "eval-niah.json").exists()


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


def test_a_resume_refuses_a_checkpoint_another_program_wrote(tmp_path):
    """`refine posttrain --resume` over a `refine train` run (or the reverse) would count its data cursor in other
    records and splice its rows into the other run's metrics.jsonl. The checkpoint says which program wrote it:
    a run record left behind in the directory does not decide."""
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    config = _config(tmp_path, "ntp", steps=2)
    model = prepare_model(config)

    def resume(program):
        return resume_from(tmp_path, True, model, make_optimizer(model, config.optim), torch.Generator(), program,
                           run_tokenizer(config))

    checkpoint = tmp_path / "checkpoints" / "latest"
    (tmp_path / "posttrain.json").write_text("{}")  # a stale record beside the train run's own
    with pytest.raises(ValueError) as refused:
        resume("refine posttrain")
    assert str(refused.value).startswith(
        f"train.out_dir={str(tmp_path)!r} holds a `refine train` run (its checkpoint {checkpoint} was written by "
        f"`refine train`): `refine posttrain --resume` continues only runs of `refine posttrain`")
    assert resume("refine") == RunPosition(1, 2, 0, "refine")

    tokenizer, generator = run_tokenizer(config), torch.Generator()
    save_run_checkpoint(tmp_path, model, make_optimizer(model, config.optim), RunPosition(3, 6, 0, "refine posttrain"),
                        generator, tokenizer)
    (tmp_path / "posttrain.json").unlink()  # only the train run's record is left: still a posttrain checkpoint
    with pytest.raises(ValueError, match="holds a `refine posttrain` run .*: `refine train --resume` continues only "
                                         "runs of `refine train`"):
        resume("refine")
    assert resume("refine posttrain") == RunPosition(3, 6, 0, "refine posttrain")


def test_a_checkpoint_that_names_no_program_is_judged_by_the_run_records(tmp_path):
    """Checkpoints written before they named their program: the directory's run records decide, and a directory
    that holds both programs' records (a fresh run left the other's behind) resumes neither."""
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    (tmp_path / "checkpoints" / "latest" / "program.json").unlink(missing_ok=True)  # as such a checkpoint
    config = _config(tmp_path, "ntp", steps=2)
    model = prepare_model(config)

    def resume(program):
        return resume_from(tmp_path, True, model, make_optimizer(model, config.optim), torch.Generator(), program,
                           run_tokenizer(config))

    with pytest.raises(ValueError, match="holds the run record of `refine train` \\(data_source.json\\)"):
        resume("refine posttrain")
    assert resume("refine").step == 1
    (tmp_path / "posttrain.json").write_text("{}")
    for program in ("refine", "refine posttrain"):
        with pytest.raises(ValueError, match="holds the run record of `refine train` \\(data_source.json\\) and "
                                             "`refine posttrain` \\(posttrain.json\\), and its checkpoint .* does "
                                             "not name the program that wrote it"):
            resume(program)


def test_a_fresh_run_removes_the_other_programs_run_record(tmp_path):
    """A fresh run's directory says whose run it holds: the other program's record goes with the checkpoint."""
    config = _config(tmp_path, "ntp", steps=1)
    for record in ("data_source.json", "posttrain.json"):
        (tmp_path / record).write_text("{}")
    start_run_directory(config, fresh=False, program="refine")  # a resumed run touches neither
    assert (tmp_path / "data_source.json").exists() and (tmp_path / "posttrain.json").exists()
    start_run_directory(config, fresh=True, program="refine")
    assert (tmp_path / "data_source.json").exists() and not (tmp_path / "posttrain.json").exists()
    (tmp_path / "posttrain.json").write_text("{}")
    start_run_directory(config, fresh=True, program="refine posttrain")
    assert not (tmp_path / "data_source.json").exists() and (tmp_path / "posttrain.json").exists()


def test_a_checkpoint_is_on_disk_before_it_is_published_and_before_the_previous_one_goes(tmp_path, monkeypatch):
    """A machine crash (not only a killed process) must leave a whole checkpoint: every file and directory of the
    new one is fsynced before the rename that publishes it, and checkpoints/ after that rename, while the
    previous checkpoint still exists."""
    config = _config(tmp_path, "ntp")
    model, tokenizer = prepare_model(config), run_tokenizer(config)
    optimizer, generator = make_optimizer(model, config.optim), torch.Generator()
    folder = tmp_path / "checkpoints"
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(1, 2, 0), generator, tokenizer)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", path, (folder / "previous").exists()))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(2, 4, 0), generator, tokenizer,
                        extra_files={"learner_state.json": "{}"})
    staging = folder / "step-00000002.partial"
    publish = events.index(("replace", staging, folder / "latest"))
    synced_before = {event[1] for event in events[:publish] if event[0] == "fsync"}
    latest = folder / "latest"
    written = {staging / path.relative_to(latest) for path in latest.rglob("*")} | {staging}
    assert {"trainer.pt", "learner_state.json", "model/model.safetensors", "model/config.json"} <= {
        str(path.relative_to(latest)) for path in latest.rglob("*")}
    assert written <= synced_before, sorted(written - synced_before)
    after = [event for event in events[publish + 1:] if event[0] == "fsync"]
    assert ("fsync", folder, True) in after  # the rename on disk while the previous checkpoint is still there
    assert not (folder / "previous").exists()


def test_a_skipped_steps_metrics_row_is_strict_json(tmp_path):
    """An infinite loss was written as Infinity, which strict JSON readers (jq, browsers, pandas' default) refuse:
    the row leaves such stats out and names them, as the service's learner does."""
    stats = train(_config(tmp_path, "onepass", steps=1, extra=("refine.lambda_ntp=1e300",)), progress=False)
    assert stats["skipped_nonfinite"] == 1.0 and "loss" in stats[NONFINITE_KEY].split(",")

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1], parse_constant=refuse)
    assert row["skipped_steps"] == 1 and "loss" not in row


def test_a_diverged_run_stops_naming_its_settings_and_keeps_its_last_checkpoint(tmp_path, capsys):
    """Every step skipped for a non-finite loss: after MAX_SKIPPED_IN_A_ROW of them the run ends with an error,
    instead of finishing as a success whose weights never moved."""
    config = _config(tmp_path, "onepass", steps=MAX_SKIPPED_IN_A_ROW + 5,
                     extra=("refine.lambda_ntp=1e300", "optim.warmup_steps=20"))
    with pytest.raises(ValueError, match=re.escape(
            f"steps 1..{MAX_SKIPPED_IN_A_ROW} were all skipped for a non-finite loss or gradient: the weights have "
            f"diverged (learning rate 0.0005 at step 10, optim.lr=0.001 with optim.warmup_steps=20, "
            f"optim.schedule='constant': each step's rate is its lr in metrics.jsonl; optim.grad_clip=1.0")):
        train(config, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, MAX_SKIPPED_IN_A_ROW + 1))
    assert not latest_checkpoint(tmp_path).exists()  # nothing worth keeping was written


def test_a_run_with_skipped_steps_warns_when_it_ends(tmp_path, capsys):
    train(_config(tmp_path, "onepass", steps=2, extra=("refine.lambda_ntp=1e300",)), progress=False)
    assert ("warning: 2 of steps 1..2 skipped an update for a non-finite loss or gradient (skipped_nonfinite in "
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


def test_a_row_that_cannot_be_written_names_its_file(tmp_path: Path) -> None:
    """metrics.jsonl and events.jsonl (the service's driver writes both the same way): a refused row names the
    file and the cause, and a file gone with its run directory says so."""
    from refine.loop import write_row

    events = tmp_path / "events.jsonl"
    events.mkdir()  # any write refused by the file system
    with pytest.raises(OSError, match=r"^cannot write a row to .*events\.jsonl \(Is a directory\): the run stops; "
                                      r"the run has no earlier checkpoint: `refine train` starts it over$"):
        write_row(events, {"event": "restart"}, "refine")
    metrics = tmp_path / "metrics.jsonl"
    metrics.mkdir()
    with pytest.raises(OSError, match=r"^cannot write step 7's row to .*metrics\.jsonl"):
        write_row(metrics, {"step": 7}, "refine")
    with pytest.raises(OSError, match=r"its events\.jsonl is gone \(the run directory was removed or moved"):
        write_row(tmp_path / "removed" / "events.jsonl", {"event": "restart"}, "refine")


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


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch, ctrl_c):
    from refine.loop import RunInterrupted

    _signalled_at(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(_config(tmp_path, "ntp", steps=4, extra=("train.checkpoint_every=1",)), progress=False)
    assert not isinstance(stopped.value, RunInterrupted)
    assert read_trainer_state(tmp_path / "checkpoints" / "latest" / "trainer.pt")["step"] == 1  # step 2 wrote none
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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
