"""`refine posttrain`: nested post-training (REFINE on the prompt + SFT on the answer) from a task file."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from refine.cli import main
from refine.data.tasks import TaskExample
from refine.evaluation.answering import prompt_tokens
from refine.models import build_model, load_model, save_model
from refine.posttrain import batch_indices, encode_example
from refine.tokenizer import ByteTokenizer, HFTokenizer

NEEDED = 8  # min_document_length(num_chunks=2, rollout_len=3, margin=4)
SMALL_REFINE = ["refine.num_chunks=2", "refine.rollout_len=3", "refine.margin=4"]


def _init_model(tmp_path):
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                             vocab_size=260, intermediate_size=32, pad_token_id=256, bos_token_id=257,
                             eos_token_id=258))  # the byte tokenizer's special ids
    return save_model(model, tmp_path / "init")


def _qa_rows(count, context_chars=110):
    rows = []
    for i in range(count):
        context = (f"Record {i}: the keeper of lighthouse {i} is named Ada{i}. " * 4)[:context_chars]
        rows.append({"prompt": f"{context}\nQuestion: who keeps lighthouse {i}?\nAnswer:", "answer": [f"Ada{i}"],
                     "index": i})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _argv(data, init, out, steps, *extra):
    sets = [f"train.init_from={init}", f"train.out_dir={out}", f"train.steps={steps}", "train.batch_size=2",
            "optim.lr=0.01", *SMALL_REFINE]
    argv = ["posttrain", "--data", str(data), "--task", "ruler-qa", "--no-progress", *extra]
    for item in sets:
        argv += ["--set", item]
    return argv


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_posttrain_trains_writes_metrics_and_a_loadable_checkpoint(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    out = tmp_path / "run"
    assert main(_argv(data, init, out, 3, "--set", "optim.warmup_steps=2")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 3 and printed["examples_used"] == 3
    rows = _metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert [row["lr"] for row in rows] == pytest.approx([0.005, 0.01, 0.01])  # optim.lr=0.01 after the warm-up
    for row in rows:
        assert row["sft_loss"] > 0 and "reward_mean" in row and "reward_std" in row and "grad_norm" in row
    assert (out / "config.yaml").is_file()
    trained = load_model(out / "checkpoints" / "latest" / "model")
    initial = load_model(init)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), initial.state_dict().values()))
    assert torch.load(out / "checkpoints" / "latest" / "trainer.pt", weights_only=True)["step"] == 3


def test_resume_continues_from_the_checkpoint_step_as_an_uninterrupted_run(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert main(_argv(data, init, resumed, 2)) == 0
    assert main(_argv(data, init, resumed, 4, "--resume")) == 0
    assert main(_argv(data, init, straight, 4)) == 0
    capsys.readouterr()
    assert [row["step"] for row in _metrics(resumed)] == [1, 2, 3, 4]
    a = load_model(resumed / "checkpoints" / "latest" / "model").state_dict()
    b = load_model(straight / "checkpoints" / "latest" / "model").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_only_too_short_prompts_fail_naming_the_file_and_the_length(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "short.jsonl", [{"prompt": "Hi?", "answer": ["yes"]}, {"prompt": "Ok", "answer": "no"}])
    assert main(_argv(data, init, tmp_path / "run", 1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("refine: error:") and "short.jsonl" in err and f">= {NEEDED} tokens" in err
    assert "of its 2 examples, 2 have a prompt too short" in err and "question and answer" not in err
    assert "Traceback" not in err


def test_only_answers_that_fill_the_sequence_fail_naming_that_cause(tmp_path, capsys):
    """Question and answer alone fill data.seq_len: the refusal says so, not that the prompts are short."""
    init = _init_model(tmp_path)
    rows = [{**row, "answer": ["long answer " * 20]} for row in _qa_rows(2)]
    assert main(_argv(_write(tmp_path / "qa.jsonl", rows), init, tmp_path / "run", 1, "--set", "data.seq_len=150")) == 2
    err = capsys.readouterr().err
    assert "of its 2 examples, 2 have a question and answer that alone fill data.seq_len=150" in err
    assert "prompt too short" not in err


def test_a_resume_on_other_data_warns_and_keeps_the_runs_first_record(tmp_path, capsys, monkeypatch):
    init = _init_model(tmp_path)
    first, other = _write(tmp_path / "qa.jsonl", _qa_rows(3)), _write(tmp_path / "other.jsonl", _qa_rows(4))
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert main(_argv("qa.jsonl", init, out, 1)) == 0
    record = (out / "posttrain.json").read_text()
    assert json.loads(record)["data"] == str(first)  # the absolute path, valid wherever a resume runs
    capsys.readouterr()
    assert main(_argv(first, init, out, 2, "--resume")) == 0  # the same data, spelled otherwise: no warning
    assert "warning" not in capsys.readouterr().err
    assert main(_argv(other, init, out, 3, "--resume", "--sft-coef", "0.5")) == 0
    err = capsys.readouterr().err
    assert f"data was {str(first)!r}, now {str(other)!r}" in err and "sft_coef was 1.0, now 0.5" in err
    assert "examples_used was 3, now 4" in err
    assert (out / "posttrain.json").read_text() == record


def test_a_resume_of_a_finished_run_trains_nothing_and_changes_nothing(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    out = tmp_path / "run"
    assert main(_argv(data, init, out, 2)) == 0
    last = json.loads(capsys.readouterr().out)
    files = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.rglob("*") if path.is_file()}
    for steps in (2, 1):
        assert main(_argv(data, init, out, steps, "--resume")) == 0
        captured = capsys.readouterr()
        assert f"refine posttrain: nothing to train: the checkpoint in {out} is at step 2, train.steps={steps}" \
            in captured.err
        printed = json.loads(captured.out)
        assert printed["step"] == 2 and printed["loss"] == last["loss"] and printed["examples_used"] == 3
        assert {path: (path.read_bytes(), path.stat().st_mtime_ns)
                for path in out.rglob("*") if path.is_file()} == files


def test_a_too_short_prompt_among_good_ones_is_skipped_and_counted(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3) + [{"prompt": "Why?", "answer": ["because"]}])
    out = tmp_path / "run"
    assert main(_argv(data, init, out, 1)) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 4 examples" in captured.err and f">= {NEEDED} tokens" in captured.err
    assert json.loads(captured.out)["skipped_short_prompt"] == 1
    summary = json.loads((out / "posttrain.json").read_text())
    assert summary["examples_used"] == 3 and summary["skipped_short_prompt"] == 1
    assert summary["skipped_long_question"] == 0


def test_examples_cut_to_fit_are_counted_as_truncated_only_when_trained_on(tmp_path, capsys):
    """With data.seq_len=20 every prompt is cut; a 14-character answer leaves it 5 tokens, too short for REFINE:
    that example counts as skipped, and the skip says it was cut, not as truncated."""
    init = _init_model(tmp_path)
    rows = _qa_rows(3)
    rows[2]["answer"] = ["A" * 14]
    out = tmp_path / "run"
    # data.min_length (a document source's) is not read: its default of 64 above data.seq_len=20 is no error.
    assert main(_argv(_write(tmp_path / "qa.jsonl", rows), init, out, 1, "--set", "data.seq_len=20")) == 0
    summary = json.loads((out / "posttrain.json").read_text())
    assert (summary["examples_used"], summary["skipped_short_prompt"], summary["truncated"]) == (2, 1, 2)
    err = capsys.readouterr().err
    assert "skipped 1 of 3 examples" in err and "1 of them were cut to fit data.seq_len=20" in err
    assert "2 examples cut in the middle to data.seq_len=20 tokens" in err


def test_a_task_file_named_without_its_format_is_read_with_data_format(tmp_path, capsys):
    """qa.data could not be read: the loader was not given data.format, which the error told the user to set."""
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.data", _qa_rows(2))
    assert main(_argv(data, init, tmp_path / "run", 1)) == 2
    assert "or set data.format" in capsys.readouterr().err
    assert main(_argv(data, init, tmp_path / "run", 1, "--set", "data.format=jsonl")) == 0
    assert json.loads((tmp_path / "run" / "posttrain.json").read_text())["examples_used"] == 2


@pytest.mark.parametrize("setting", ["data.text_column=foo", "data.num_documents=1", "data.synthetic_tasks=[niah]",
                                     "data.max_windows=2", "data.eval_documents=3"])
def test_a_document_source_setting_is_refused(setting, tmp_path, capsys):
    """Each was accepted and changed nothing."""
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(2))
    assert main(_argv(data, init, tmp_path / "run", 1, "--set", setting)) == 2
    name = setting.split("=")[0]
    assert f"{name}=" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_rollout_settings_are_not_held_to_data_min_length(tmp_path):
    """refine.margin=40 needs documents of 80 tokens: it was refused as data.min_length (64 by default) admitting
    shorter ones, and data.min_length, which posttrain does not read, was refused too. Prompts are measured."""
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(2))
    out = tmp_path / "run"
    assert main(_argv(data, init, out, 1) + ["--set", "refine.margin=40"]) == 0
    assert json.loads((out / "posttrain.json").read_text())["min_prompt_tokens"] == 80


def test_skipped_bad_rows_are_counted_in_the_run_summary(tmp_path):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    data.write_text(data.read_text() + "{not json\n")
    out = tmp_path / "run"
    assert main(_argv(data, init, out, 1, "--set", "data.skip_bad_rows=true")) == 0
    summary = json.loads((out / "posttrain.json").read_text())
    assert summary["skipped_bad_rows"] == 1 and summary["examples_read"] == 3


def test_refine_sees_the_whole_prompt_a_long_one_is_cut_in_its_context_and_the_answer_ends_with_eos():
    tokenizer = ByteTokenizer()
    example = TaskExample(example_id="0", task="hotpotqa", prompt="Read: CONTEXT TEXT\nQ: why?\nA:", answers=["so"],
                          context="CONTEXT TEXT", question="why?")
    encoded, cut = encode_example(example, tokenizer, max_tokens=100)
    assert encoded.prompt == [tokenizer.bos_id] + tokenizer.encode("Read: CONTEXT TEXT\nQ: why?\nA:") and not cut
    assert encoded.answer == tokenizer.encode("so") + [tokenizer.eos_id]
    # Too long: the context is cut in the middle; question and answer stay whole.
    encoded, cut = encode_example(example, tokenizer, max_tokens=20)
    question = tokenizer.encode("\nQ: why?\nA:")
    assert cut and len(encoded.prompt) + len(encoded.answer) == 20 and encoded.prompt[-len(question):] == question
    assert encoded.prompt[0] == tokenizer.bos_id and encoded.prompt[-len(question) - 1] == ord("T")
    # Question and answer alone fill the budget: no room for the context.
    assert encode_example(example, tokenizer, max_tokens=len(question) + len(encoded.answer)) == (None, True)


def test_a_prompt_that_fits_gets_the_tokens_refine_eval_feeds_a_subword_tokenizer_merging_across_the_context_end(
        tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(["The fox sleeps.\n\n\nRequest: Which fox?\nAnswer: brown\n\n"] * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    rust.save(str(tmp_path / "tokenizer.json"))
    tokenizer = HFTokenizer(tmp_path)
    # A LongBench-style prompt whose context ends in "\n" before the template's "\n\nRequest:".
    context = "The fox sleeps.\n"
    example = TaskExample(example_id="0", task="hotpotqa", prompt=f"{context}\n\nRequest: Which fox?\nAnswer:",
                          answers=["brown"], context=context, question="Which fox?")
    assert tokenizer.encode(context) + tokenizer.encode(example.prompt[len(context):]) != tokenizer.encode(
        example.prompt)  # the merge this test is about
    encoded, cut = encode_example(example, tokenizer, max_tokens=1000)
    assert not cut and encoded.prompt == prompt_tokens(tokenizer, example.prompt, None)[0]


def test_examples_whose_question_and_answer_fill_the_sequence_are_skipped_and_counted(tmp_path, capsys):
    init = _init_model(tmp_path)
    rows = [{"context": f"The keeper of lighthouse {i} is named Ada{i}. " * 3, "input": f"Who keeps lighthouse {i}?",
             "answers": [f"Ada{i}"], "dataset": "hotpotqa"} for i in range(2)]
    rows.append({"context": "Short.", "input": "Why " * 40 + "?", "answers": ["because"], "dataset": "hotpotqa"})
    data = _write(tmp_path / "hotpotqa.jsonl", rows)
    out = tmp_path / "run"
    argv = _argv(data, init, out, 1, "--set", "data.seq_len=150")
    argv[argv.index("ruler-qa")] = "longbench"
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 3 examples" in captured.err
    assert "question and answer alone fill data.seq_len=150" in captured.err
    summary = json.loads((out / "posttrain.json").read_text())
    assert (summary["examples_used"], summary["skipped_long_question"], summary["skipped_short_prompt"]) == (2, 1, 0)


def test_batches_cycle_through_every_example_each_pass():
    drawn = [batch_indices(5, 0, cursor, 2) for cursor in range(0, 10, 2)]
    flat = [i for batch in drawn for i in batch]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    assert batch_indices(5, 0, 4, 3) == flat[4:7]  # any cursor reproduces the same stream


def test_sft_coef_must_be_finite_and_is_checked_before_anything_is_written(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    # 1e39 is inf in the float32 loss, as inf is: every SFT update would be skipped.
    for coef in ("inf", "nan", "-1", "1e39"):
        assert main(_argv(data, init, tmp_path / "run", 1, "--sft-coef", coef)) == 2
        err = capsys.readouterr().err
        assert err.startswith("refine: error: --sft-coef must be a number from 0 to 3.403e+38")
        assert err.endswith(f"got {float(coef)}\n")
    assert not (tmp_path / "run").exists()


def test_a_posttrain_that_cannot_start_leaves_its_directory_as_it_was(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    out = tmp_path / "run"
    assert main(_argv(data, init, out, 1)) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert {"config.yaml", "posttrain.json", "metrics.jsonl"} <= set(before)
    trainer = out / "checkpoints" / "latest" / "trainer.pt"
    trainer.write_bytes(b"\x01" * 100)  # the resume fails on it
    more = _write(tmp_path / "more.jsonl", _qa_rows(5))  # another summary in posttrain.json, if it were written
    assert main(_argv(more, init, out, 2, "--resume")) == 2
    assert f"{trainer}: not a readable training checkpoint" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_an_eval_source_shuffling_a_data_source_or_a_min_length_is_refused_before_anything_is_written(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    assert main(_argv(data, init, tmp_path / "run", 1, "--set", "data.eval_source=synthetic")) == 2
    assert "data.eval_source='synthetic': refine posttrain measures no held-out loss" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(_argv(data, init, tmp_path / "run", 1, "--set", f"data.source={data}", "--set", "data.shuffle=true")) == 2
    assert "data.shuffle=true: refine posttrain reads --data, not data.source" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(_argv(data, init, tmp_path / "run", 1, "--set", f"data.source={data}")) == 2
    assert f"data.source={str(data)!r}: refine posttrain reads its examples from --data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(_argv(data, init, tmp_path / "run", 1, "--set", "data.min_length=8")) == 2
    assert "data.min_length=8: refine posttrain skips the examples whose prompt is too short" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_task_file_that_the_run_writes_is_refused_and_left_as_it_was(tmp_path, capsys):
    """`--data RUN/metrics.jsonl` with train.out_dir=RUN: the run overwrote the task file with its own rows."""
    init = _init_model(tmp_path)
    (tmp_path / "run").mkdir()
    data = _write(tmp_path / "run" / "metrics.jsonl", _qa_rows(3))
    before = data.read_bytes()
    assert main(_argv(data, init, tmp_path / "run", 1)) == 2
    assert capsys.readouterr().err.startswith(f"refine: error: --data='{data}' is a file that this run writes")
    assert data.read_bytes() == before and sorted(path.name for path in (tmp_path / "run").iterdir()) == [
        "metrics.jsonl"]


def test_micro_batches_are_refused_before_anything_is_written(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    # In fused mode too: the fused step's refusal would advise onepass, which refuses micro-batches here as well.
    argv = _argv(data, init, tmp_path / "run", 1, "--set", "train.micro_batches=2", "--set", "train.mode=fused")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("refine: error: train.micro_batches=2: post-training's SFT step trains "
                                              "on the whole batch at once")
    assert not (tmp_path / "run").exists()


def test_fused_mini_batches_are_refused_before_anything_is_written(tmp_path, capsys):
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    assert main(_argv(data, init, tmp_path / "run", 1, "--set", "train.mini_batches=2")) == 2
    assert capsys.readouterr().err.startswith("refine: error: train.mini_batches=2 needs train.mode 'onepass' or "
                                              "'reference'")
    assert not (tmp_path / "run").exists()


def test_onepass_mini_batches_take_a_refine_step_per_mini_batch_then_one_sft_step(tmp_path, capsys):
    """The paper's code's post-training: rollouts sampled once per batch, an optimizer step per mini-batch of
    prompts, then one SFT step over the batch: 2 + 1 optimizer steps per training step here."""
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(4))
    out = tmp_path / "run"
    assert main(_argv(data, init, out, 2, "--set", "train.mode=onepass", "--set", "train.mini_batches=2")) == 0
    rows = _metrics(out)
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["sft_loss"] > 0 and row["reward_mean"] == row["reward_mean"] for row in rows)
    trainer = torch.load(out / "checkpoints" / "latest" / "trainer.pt", weights_only=True)
    steps = {float(state["step"]) for state in trainer["optimizer"]["state"].values()}
    assert steps == {6.0}  # 2 training steps x (2 REFINE mini-batches + 1 SFT)


def _train_argv(out, steps, *extra):
    """A tiny `refine train --local` run (NTP on the synthetic corpus) in directory `out`."""
    sets = ["demo=null", "train.mode=ntp", f"train.steps={steps}", f"train.out_dir={out}", "train.batch_size=2",
            "data.seq_len=256", "data.num_documents=8", "data.synthetic_tasks=[recall]", "model.hidden_size=32",
            "model.intermediate_size=64",
            "model.num_hidden_layers=1"]
    argv = ["train", "configs/demo.yaml", "--local", "--no-progress", *extra]
    for item in sets:
        argv += ["--set", item]
    return argv


def test_a_resume_refuses_a_directory_whose_latest_run_another_program_made(tmp_path, capsys, monkeypatch):
    """The review's case: a posttrain run, then a fresh `refine train` run in the same directory (which left
    posttrain.json behind), then `refine posttrain --resume` with that run's config: it resumed at the train
    run's step 3, read its document cursor as an example cursor and spliced its rows into metrics.jsonl."""
    monkeypatch.chdir(Path(__file__).parents[1])  # configs/demo.yaml
    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    mix = tmp_path / "mix"
    assert main(_argv(data, init, mix, 2)) == 0
    assert main(_train_argv(mix, 3)) == 0
    assert not (mix / "posttrain.json").exists()  # the fresh run removed the posttrain run's record
    capsys.readouterr()
    before = (mix / "metrics.jsonl").read_bytes()
    trained = shutil.copytree(mix / "checkpoints" / "latest" / "model", tmp_path / "trained")
    resume = ["posttrain", "--config", str(mix / "config.yaml"), "--data", str(data), "--task", "ruler-qa",
              "--resume", "--no-progress"]
    for item in ["train.steps=5", "train.mode=fused", f"train.init_from={trained}", *SMALL_REFINE]:
        resume += ["--set", item]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert f"train.out_dir={str(mix)!r} holds a `refine train` run" in err
    assert "`refine posttrain --resume` continues only runs of `refine posttrain`" in err
    assert (mix / "metrics.jsonl").read_bytes() == before
    # A stale record is no guide: with posttrain.json put back, the checkpoint still says whose run it is.
    (mix / "posttrain.json").write_text("{}")
    assert main(resume) == 2
    assert "holds a `refine train` run" in capsys.readouterr().err

    # The reverse: a fresh posttrain run over it, then `refine train --resume`.
    assert main(_argv(data, init, mix, 1)) == 0
    assert not (mix / "data_source.json").exists()
    capsys.readouterr()
    assert main(_train_argv(mix, 4, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"train.out_dir={str(mix)!r} holds a `refine posttrain` run" in err
    assert "`refine train --resume` continues only runs of `refine train`" in err


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_printed_command_resumes_it(tmp_path, capsys,
                                                                                          monkeypatch, ctrl_c):
    import os
    import re
    import shlex
    import signal

    import refine.posttrain as posttrain

    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(3))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(_argv(data, init, straight, 4, "--sft-coef", "0.5")) == 0
    real, taken = posttrain.posttrain_step, []

    def step_then_ctrl_c(*args, **kwargs):
        taken.append(1)
        result = real(*args, **kwargs)
        if len(taken) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(posttrain, "posttrain_step", step_then_ctrl_c)
    assert main(_argv(data, init, stopped, 4, "--sft-coef", "0.5")) == 130
    assert torch.load(stopped / "checkpoints" / "latest" / "trainer.pt", weights_only=True)["step"] == 2
    err = capsys.readouterr().err
    command = re.search(r"interrupted at step 2 of train\.steps=4; resume with `(.+)`", err).group(1)
    assert "--sft-coef 0.5" in command and command.endswith("--resume")
    monkeypatch.undo()
    assert main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    assert [row["step"] for row in _metrics(stopped)] == [1, 2, 3, 4]
    a = load_model(stopped / "checkpoints" / "latest" / "model").state_dict()
    b = load_model(straight / "checkpoints" / "latest" / "model").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_config_silent_on_the_reward_trains_with_the_papers_hybrid_reward_library_and_config_file_alike(
        tmp_path, capsys):
    import yaml

    from refine.config import RunConfig
    from refine.posttrain import posttrain

    init = _init_model(tmp_path)
    data = _write(tmp_path / "qa.jsonl", _qa_rows(2))
    small = {"num_chunks": 2, "rollout_len": 3, "margin": 4}
    library = RunConfig.model_validate({"train": {"init_from": str(init), "out_dir": str(tmp_path / "library"),
                                                  "steps": 1, "batch_size": 2}, "refine": small})
    posttrain(library, data, "ruler-qa", progress=False)
    recorded = yaml.safe_load((tmp_path / "library" / "config.yaml").read_text())
    assert recorded["refine"]["reward"] == "hybrid"

    config_file = tmp_path / "silent.yaml"
    config_file.write_text(yaml.safe_dump({"refine": small, "train": {"steps": 1, "batch_size": 2}}))
    cli_out = tmp_path / "cli"
    assert main(["posttrain", "--data", str(data), "--task", "ruler-qa", "--no-progress", "--config",
                 str(config_file), "--set", f"train.init_from={init}", "--set", f"train.out_dir={cli_out}"]) == 0
    assert yaml.safe_load((cli_out / "config.yaml").read_text())["refine"]["reward"] == "hybrid"
    # A reward the config names is kept.
    config_file.write_text(yaml.safe_dump({"refine": small | {"reward": "binary"}, "train": {"steps": 1}}))
    assert main(["posttrain", "--data", str(data), "--task", "ruler-qa", "--no-progress", "--config",
                 str(config_file), "--set", f"train.init_from={init}", "--set", f"train.out_dir={tmp_path / 'b'}",
                 "--set", "train.batch_size=2"]) == 0
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["refine"]["reward"] == "binary"
