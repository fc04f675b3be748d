"""The main job (`refine train` on configs/demo.yaml): NTP pre-training, then REFINE and NTP branches, compared."""

import json
from pathlib import Path

import pytest

from test_tokenizer import write_bpe_tokenizer

from refine.config import load_config, run_tokenizer
from refine.experiment import run_comparison, stage_config
from refine.loop import train
from refine.models import build_model, save_model
from refine.tokenizer import HFTokenizer, load_tokenizer, save_tokenizer_files


def test_a_shrunk_comparison_trains_three_stages_and_reports_them(tmp_path, capsys):
    config = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", [
        f"train.out_dir={tmp_path}", "demo.pretrain_steps=3", "demo.branch_steps=2", "demo.eval_examples=2",
        "demo.heldout_documents=2", "data.seq_len=512", "data.num_documents=16", "train.batch_size=2",
        "model.hidden_size=32", "model.intermediate_size=64", "demo.eval_length=384", "refine.margin=4",
    ])
    report = run_comparison(config, lambda stage: train(stage, progress=False))
    assert list(report["rows"]) == ["NTP pre-training", "+ REFINE", "+ NTP"]
    assert [row["steps"] for row in report["rows"].values()] == [3, 5, 5]
    for row in report["rows"].values():
        assert row["heldout_ntp_loss"] > 0 and 0 <= row["niah"] <= 100 and 0 <= row["mqar"] <= 100
    refine_rows = [json.loads(line) for line in (tmp_path / "refine" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in refine_rows] == [1, 2] and all("reward_mean" in row for row in refine_rows)
    assert json.loads((tmp_path / "comparison.json").read_text())["table"] == report["table"]
    assert (tmp_path / "comparison.png").stat().st_size > 1000 and report["table"] in capsys.readouterr().out


SHRUNK = ["demo.pretrain_steps=3", "demo.branch_steps=2", "demo.eval_examples=2", "demo.heldout_documents=2",
          "data.seq_len=512", "data.num_documents=16", "train.batch_size=2", "model.hidden_size=32",
          "model.intermediate_size=64", "demo.eval_length=384", "refine.margin=4"]


def test_a_fresh_main_job_starts_every_stage_over_and_a_resume_keeps_the_branches_on_their_model(tmp_path, capsys):
    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"

    def shrunk(*sets: str):
        return load_config(demo, [f"train.out_dir={tmp_path}", *SHRUNK, *sets])

    def resumed(stage):
        return train(stage, resume=True, progress=False)

    run_comparison(shrunk(), lambda stage: train(stage, progress=False))
    # A resume that asks for fewer branch steps trains nothing: the table says the steps of the models evaluated.
    report = run_comparison(shrunk("demo.branch_steps=1"), resumed, resume=True)
    assert [row["steps"] for row in report["rows"].values()] == [3, 5, 5]
    # Training the pre-trained model further would leave the branches on the model they started from: refused.
    with pytest.raises(ValueError, match=r"--resume: the refine and ntp branch in .* started from the pre-trained "
                                         r"model at step 3, which demo.pretrain_steps=5 would train further"):
        run_comparison(shrunk("demo.pretrain_steps=5"), resumed, resume=True)

    def stopped(stage):
        raise KeyboardInterrupt  # a fresh run stopped in its pre-training

    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run_comparison(shrunk("demo.pretrain_steps=5"), stopped)
    # Its --resume would otherwise have taken the earlier run's branches, trained from the 3-step model.
    assert not any((tmp_path / stage / "checkpoints" / "latest").exists() for stage in ("pretrain", "refine", "ntp"))
    assert not (tmp_path / "comparison.json").exists()
    assert "removed the earlier run's checkpoints of pretrain, refine, ntp and comparison.json" in capsys.readouterr().err


def test_a_stop_during_a_stages_last_step_ends_the_main_job_before_its_next_stage(tmp_path, monkeypatch, capfd,
                                                                                  ctrl_c):
    """The stage had trained all its steps, so its loop ended without RunInterrupted: the main job acknowledged the
    stop, then started Ray, trained both branches and evaluated them, and exited 0."""
    import signal

    from test_loop import _signalled_at

    from refine.checkpoints import read_trainer_state
    from refine.loop import RunInterrupted

    config = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", [f"train.out_dir={tmp_path}", *SHRUNK])
    started = []

    def stage_trainer(stage, resume: bool = False):
        started.append(Path(stage.train.out_dir).name)
        return train(stage, resume=resume, progress=False, job_stage=True)

    _signalled_at(monkeypatch, 3, [signal.SIGINT])  # during the pre-training's last step (demo.pretrain_steps=3)
    with pytest.raises(RunInterrupted):
        run_comparison(config, stage_trainer)
    assert started == ["pretrain"]
    assert read_trainer_state(tmp_path / "pretrain" / "checkpoints" / "latest" / "trainer.pt")["step"] == 3
    assert "interrupted at step 3 of train.steps=3; resume with" in capfd.readouterr().err
    monkeypatch.undo()
    report = run_comparison(config, lambda stage: stage_trainer(stage, resume=True), resume=True)
    assert started == ["pretrain", "pretrain", "refine", "ntp"]  # the resume goes on with the next stages
    assert [row["steps"] for row in report["rows"].values()] == [3, 5, 5]


def test_every_stage_uses_the_comparisons_tokenizer(tmp_path):
    write_bpe_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    model = build_model(dict(model_type="delta_net", vocab_size=320, hidden_size=32, num_heads=2, num_hidden_layers=1,
                             eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id))
    save_model(model, tmp_path / "ckpt")
    save_tokenizer_files(tokenizer, tmp_path / "ckpt")
    # The comparison's tokenizer comes from train.init_from; its pre-training stage starts from scratch.
    config = load_config(None, [f"train.init_from={tmp_path / 'ckpt'}"])
    comparison_tokenizer = run_tokenizer(config)
    assert isinstance(comparison_tokenizer, HFTokenizer)
    stage = stage_config(config, "pretrain", "ntp", 3, 1e-3, None, comparison_tokenizer)
    assert stage.train.init_from is None
    staged = run_tokenizer(stage)
    assert isinstance(staged, HFTokenizer) and staged.encode("some text") == comparison_tokenizer.encode("some text")


def test_every_stage_takes_the_same_mini_batches():
    # The branches must take as many optimizer steps: NTP splits its steps as REFINE does.
    config = load_config(None, ["train.mode=onepass", "train.mini_batches=2"])
    tokenizer = run_tokenizer(config)
    for name, mode in (("pretrain", "ntp"), ("refine", "onepass"), ("ntp", "ntp")):
        assert stage_config(config, name, mode, 3, 1e-3, None, tokenizer).train.mini_batches == 2


def test_an_eval_length_too_short_for_the_eval_sets_fails_before_anything_trains(tmp_path):
    config = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", [
        f"train.out_dir={tmp_path}", "demo.eval_length=100", "demo.pretrain_steps=1", "demo.branch_steps=1"])
    stages = []
    with pytest.raises(ValueError, match=r"demo.eval_length=100 is too short for the niah evaluation set: its prompt "
                                         r"without filler takes up to \d+ tokens"):
        run_comparison(config, stages.append)
    assert stages == []  # no stage was trained


def test_held_out_documents_too_long_for_data_seq_len_fail_before_anything_trains(tmp_path):
    config = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", [
        f"train.out_dir={tmp_path}", "data.synthetic_tasks=[mqar]", "data.seq_len=160", "demo.pretrain_steps=1",
        "demo.branch_steps=1", "demo.eval_examples=2"])
    stages = []
    with pytest.raises(ValueError, match=r"^data.seq_len=160 is too short for the main job's held-out recall "):
        run_comparison(config, stages.append)
    assert stages == []


# Ctrl-C in the REFINE branch's first step, after 3 of pre-training; or in the pre-training's last step, which ends
# the main job too (the command's stages are job stages: it must not start the next one).
@pytest.mark.parametrize("ctrl_c_at, stopped_at", [(4, "step 1 of train.steps=2"), (3, "step 3 of train.steps=3")])
def test_a_stopped_main_job_prints_its_own_command_which_goes_on_from_each_stages_checkpoint(tmp_path, capsys,
                                                                                             monkeypatch, ctrl_c,
                                                                                             ctrl_c_at, stopped_at):
    import os
    import re
    import shlex
    import signal

    import refine.loop as loop
    from refine.cli import main

    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"
    sets = ["demo.pretrain_steps=3", "demo.branch_steps=2", "demo.eval_examples=2", "demo.heldout_documents=2",
            "data.seq_len=512", "data.num_documents=16", "train.batch_size=2", "model.hidden_size=32",
            "model.intermediate_size=64", "demo.eval_length=384", "refine.margin=4", f"train.out_dir={tmp_path}"]
    real, taken = loop.train_step, []

    def step_then_ctrl_c(*args, **kwargs):
        taken.append(1)
        result = real(*args, **kwargs)
        if len(taken) == ctrl_c_at:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(loop, "train_step", step_then_ctrl_c)
    argv = ["train", str(demo), *[arg for item in sets for arg in ("--set", item)], "--local", "--no-progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    command = shlex.split(re.search(rf"interrupted at {re.escape(stopped_at)}; resume with `(.+)`", err).group(1))
    assert command == ["refine", "train", str(demo), *argv[2:-2], "--local", "--resume"]  # out_dir is absolute
    monkeypatch.undo()
    assert main(command[1:] + ["--no-progress"]) == 0
    assert "nothing to train" in capsys.readouterr().err  # the pre-training had finished: it is not trained again
    steps = {stage: [json.loads(line)["step"] for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
             for stage in ("pretrain", "refine", "ntp")}
    assert steps == {"pretrain": [1, 2, 3], "refine": [1, 2], "ntp": [1, 2]}
    assert (tmp_path / "comparison.json").exists()


@pytest.mark.parametrize("sets, words", [
    (["refine.margin=300"], "data.seq_len=512 is too short for refine.num_chunks=8"),
    (["train.mini_batches=2"], "train.mini_batches=2 needs train.mode 'onepass' or 'reference'"),
])
def test_a_refine_branch_that_cannot_run_fails_before_the_pre_training(tmp_path, sets, words):
    # train.mode=ntp skips the REFINE checks at load, but the branch still runs (fused).
    config = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", [
        f"train.out_dir={tmp_path}", "train.mode=ntp", "demo.pretrain_steps=1", "demo.branch_steps=1", *sets])
    with pytest.raises(ValueError, match=r"the main job's REFINE branch \(train.mode=fused, as train.mode=ntp makes "
                                         r"it\) cannot run") as refusal:
        run_comparison(config, lambda stage: train(stage, progress=False))
    assert words in str(refusal.value)
    assert not (tmp_path / "pretrain").exists()
