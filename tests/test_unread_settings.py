"""`refine train` names the --set settings a run will not read, and why."""

import pytest

from refine.cli import main
from refine.config import load_config
from refine.unread_settings import unread_overrides, why_unread


@pytest.mark.parametrize(("overrides", "key", "why"), [
    (["data.source=books.jsonl"], "data.num_documents",
     "data.source='books.jsonl' is read instead of the synthetic corpus that data.num_documents describes"),
    (["data.source=books.jsonl"], "data.synthetic_tasks",
     "data.source='books.jsonl' is read instead of the synthetic corpus that data.synthetic_tasks describes"),
    ([], "data.text_column", "data.source='synthetic' and no data.eval_source: the run reads no data file"),
    ([], "data.format", "data.source='synthetic' and no data.eval_source: the run reads no data file"),
    ([], "data.skip_bad_rows", "data.source='synthetic' and no data.eval_source: the run reads no data file"),
    ([], "data.eval_documents", "no data.eval_source is set: the run measures no held-out loss"),
    (["train.mode=ntp"], "refine.num_chunks", "train.mode='ntp' trains next-token prediction only"),
    (["train.mode=ntp"], "refine", "train.mode='ntp' trains next-token prediction only"),
    ([], "refine.kl_type", "refine.kl_coef=0 leaves out the KL term"),
])
def test_a_setting_the_run_does_not_read_is_named_with_the_reason(overrides, key, why):
    assert why_unread(load_config(None, overrides), key, in_process=None) == why


@pytest.mark.parametrize(("overrides", "key"), [
    ([], "data.num_documents"),
    (["data.source=books.jsonl"], "data.text_column"),
    (["data.eval_source=held.jsonl"], "data.format"),  # the held-out file is read with it
    (["data.eval_source=held.jsonl"], "data.eval_documents"),
    (["train.mode=onepass"], "refine.num_chunks"),
    (["train.mode=ntp", "demo={}"], "refine.num_chunks"),  # the main job trains a REFINE branch
    (["refine.kl_coef=0.1"], "refine.kl_type"),
    (["optim.schedule=cosine"], "optim.min_lr_ratio"),
    ([], "optim.min_lr_ratio"),  # the config refuses it above 0 with the constant schedule
    ([], "service.num_rollout_workers"),  # on the service
    ([], "train.steps"),
    ([], "model.hidden_size"),
])
def test_a_setting_the_run_reads_is_not_named(overrides, key):
    assert why_unread(load_config(None, overrides), key, in_process=None) is None


def test_service_settings_are_unread_in_a_single_process():
    config = load_config(None, [])
    assert unread_overrides(config, ["service.num_rollout_workers", "train.steps", "service.num_rollout_workers"],
                            "--local") == [
        "--set service.num_rollout_workers unused: --local trains in this process, without Ray or Redis"]


def test_refine_train_warns_about_each_unread_setting_and_trains(tmp_path, capsys):
    argv = ["train", "--local", "--no-progress", "--set", "demo=null", "--set", "train.mode=ntp", "--set",
            "train.steps=1", "--set", "data.num_documents=4", "--set", f"train.out_dir={tmp_path}", "--set",
            "refine.num_samples=4", "--set", "service.num_rollout_workers=3", "--set", "data.text_column=body"]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unused:" in line]
    assert warnings == [
        "refine: --set refine.num_samples unused: train.mode='ntp' trains next-token prediction only",
        "refine: --set service.num_rollout_workers unused: --local trains in this process, without Ray or Redis",
        "refine: --set data.text_column unused: data.source='synthetic' and no data.eval_source: the run reads no "
        "data file",
    ]
    assert (tmp_path / "metrics.jsonl").exists()
