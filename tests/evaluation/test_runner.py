"""`refine eval` end to end on a tiny model: its options and the checks run before the model loads, the examples
it builds, where it writes the results and what they hold."""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from eval_helpers import LONGBENCH_ROWS, RULER_ROWS, TOKENIZER, run_eval, write_jsonl
from test_tokenizer import write_gapped_tokenizer

from refine.config import OptimConfig, RunConfig
from refine.data.synthetic import NiahConfig, generate_niah
from refine.data.tasks import MAX_GEN_TOKENS, TaskExample
from refine.evaluation import answering, runner
from refine.evaluation.answering import evaluate
from refine.evaluation.runner import default_output
from refine.evaluation.task_scoring import score_examples
from refine.models import load_model
from refine.tokenizer import load_tokenizer


# ---------------------------------------------------------------- the command


def test_eval_shows_its_progress_bar_unless_told_not_to(model_dir, tmp_path, capsys):
    argv = ["--model", str(model_dir), "--task", "niah", "--num-examples", "1", "--length", "320",
            "--max-new-tokens", "2", "--output", str(tmp_path / "results.json")]
    code, _, err = run_eval(capsys, *argv)
    assert code == 0 and "eval[niah]" in err
    code, _, err = run_eval(capsys, *argv, "--no-progress")
    assert code == 0 and "eval[niah]" not in err


def test_an_output_ending_in_a_slash_is_refused_before_the_model_loads(model_dir, tmp_path, capsys):
    """`--output newout/` wrote the results to a file named newout."""
    code, _, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", "--num-examples", "1", "--length",
                            "320", "--output", f"{tmp_path / 'newout'}/")
    assert code == 2 and err == (f"refine: error: --output '{tmp_path / 'newout'}/' ends in '/', which names a "
                                 f"folder: give a file path\n")
    assert not (tmp_path / "newout").exists()


def test_an_interrupted_eval_says_nothing_was_written_and_closes_its_bar_first(model_dir, tmp_path, capsys,
                                                                            monkeypatch, ctrl_c):
    """Ctrl-C dropped every answer computed so far with only "refine: interrupted" (no word of the results file),
    and the open progress bar was drawn again after it."""
    real_generate = answering.generate
    calls = []

    def generate_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(answering, "generate", generate_then_ctrl_c)
    output = tmp_path / "results.json"
    output.write_text("earlier")
    argv = ["--model", str(model_dir), "--task", "niah", "--num-examples", "3", "--length", "320",
            "--max-new-tokens", "2", "--output", str(output), "--set", "eval.batch_size=1"]
    code, _, err = run_eval(capsys, *argv)
    assert code == 130 and output.read_text() == "earlier"
    assert err.endswith(f"refine eval: interrupted: nothing written to '{output}' (the earlier file there is kept as "
                        f"it was); the same command evaluates again\nrefine: interrupted\n"), err
    # An --output in folders not there yet: they are made when the results are written, so none is left behind.
    calls.clear()
    nested = tmp_path / "sweep" / "len320" / "results.json"
    code, _, err = run_eval(capsys, *argv[:-4], "--output", str(nested), "--set", "eval.batch_size=1")
    assert code == 130 and not (tmp_path / "sweep").exists(), err


@pytest.mark.parametrize("ttt", [False, True], ids=["plain", "ttt"])
@pytest.mark.parametrize("task", ["niah", "mqar", "ruler-qa", "longbench"])
def test_eval_command_writes_scored_results(task, ttt, model_dir, task_files, tmp_path, capsys):
    argv = ["--model", str(model_dir), "--task", task, "--num-examples", "2"]
    if task in task_files:
        argv += ["--data", str(task_files[task])]
    else:
        argv += ["--length", "320", "--max-new-tokens", "6"]
    output = tmp_path / "out" / "results.json"
    code, line, err = run_eval(capsys, *argv, "--output", str(output), *(["--ttt", "--ttt-steps", "1"] if ttt else []))
    assert code == 0, err
    assert line["task"] == task and line["num_examples"] == 2 and line["ttt"] is ttt
    assert 0.0 <= line["score"] <= 100.0 and line["seconds"] >= 0
    results = json.loads(output.read_text())
    summary, records = results["summary"], results["examples"]
    assert summary["score"] == line["score"] and summary["ttt"] is ttt and len(records) == 2
    for record in records:
        assert set(record) >= {"id", "prompt_tokens", "prediction", "answers", "score"}
        assert 0.0 <= record["score"] <= 100.0 and isinstance(record["prediction"], str)
        assert record["prompt_tokens"] > 0 and record["answers"]
        if ttt:
            assert len(record["ttt_history"]) == 1 and record["ttt_history"][0]["grad_norm"] > 0
    if task == "ruler-qa":  # max_gen_tokens of the row bounds the answer when --max-new-tokens is not given
        assert records[0]["generated_tokens"] <= 3 and records[1]["generated_tokens"] <= 32
        assert [r["task"] for r in records] == ["ruler_squadqa", "qa"]  # the second row is RULER's own task
    if task == "longbench":  # two datasets, each with its own metric, averaged as LongBench averages
        assert set(summary["by_task"]) == {"hotpotqa", "trec"}
        assert summary["metric"] == ["classification_score", "qa_f1_score"]
        by_task = [v["score"] for v in summary["by_task"].values()]
        assert summary["score"] == pytest.approx(sum(by_task) / 2, abs=0.01)
        hotpotqa = summary["by_task"]["hotpotqa"]  # rows give their length: LongBench-E's per-length scores
        assert hotpotqa["score_by_length"] == {"0-4k": hotpotqa["score"], "4-8k": None, "8k+": None}
    if task in ("niah", "mqar"):
        assert all(r["prompt_tokens"] <= 320 + 1 for r in records)  # + BOS


def test_default_output_path_and_paper_test_time_defaults(model_dir, capsys):
    argv = ["--model", str(model_dir), "--task", "mqar", "--num-examples", "1", "--length", "128",
            "--max-new-tokens", "4", "--ttt", "--ttt-steps", "1"]
    code, line, err = run_eval(capsys, *argv)
    assert code == 0, err
    assert line["output"] == str(model_dir / "eval-mqar-len128-ttt.json")
    ttt_config = json.loads((model_dir / "eval-mqar-len128-ttt.json").read_text())["summary"]["ttt_config"]
    assert ttt_config["reward"] == "binary" and ttt_config["lambda_nsp"] == 0.4
    code, line, err = run_eval(capsys, *argv, "--set", "refine.reward=cosine", "--output", str(model_dir / "c.json"))
    assert code == 0, err
    ttt_config = json.loads((model_dir / "c.json").read_text())["summary"]["ttt_config"]
    assert ttt_config["reward"] == "cosine" and ttt_config["lambda_nsp"] == 0.4


def test_ttt_leaves_the_checkpoint_and_the_weights_unchanged(model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    code, _, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", "--num-examples", "1",
                            "--length", "320", "--ttt", "--ttt-steps", "2", "--max-new-tokens", "4",
                            "--set", "optim.lr=0.05", "--output", str(tmp_path / "r.json"))
    assert code == 0, err
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest

    model = load_model(model_dir)
    probe = torch.tensor([TOKENIZER.encode("The secret number is 42.")])
    before = model(probe).logits.detach().clone()
    examples = generate_niah(NiahConfig(length=320, seed=3), TOKENIZER, 2)
    config = RunConfig(optim=OptimConfig(lr=0.05))
    results = evaluate(model, TOKENIZER, examples, "niah", ttt=True, run_config=config, ttt_steps=2,
                       max_new_tokens=4, progress=False)
    steps = [step for record in results["examples"] for step in record["ttt_history"]]
    assert len(steps) == 4 and all(step["grad_norm"] > 0 and "skipped_nonfinite" not in step for step in steps)
    assert torch.equal(model(probe).logits, before)  # adapted weights were put back after every example


def test_results_of_a_model_in_a_runs_checkpoints_go_to_the_run_directory(tmp_path):
    """The run's next checkpoint replaces checkpoints/latest whole: results written into it would be lost."""
    model = tmp_path / "run" / "checkpoints" / "latest" / "model"
    assert default_output(model, "niah", ttt=True) == (tmp_path / "run" / "eval-niah-ttt.json").resolve()
    assert default_output(tmp_path / "exported", "niah", ttt=False) == tmp_path / "exported" / "eval-niah.json"
    # A kept checkpoint's results are named after it: each kept checkpoint has its own.
    kept = tmp_path / "run" / "checkpoints" / "step-00000040" / "model"
    assert default_output(kept, "niah", ttt=False) == (tmp_path / "run" / "eval-niah-step-00000040.json").resolve()
    # Models kept in a folder named checkpoints/ (an fla download's) are no run's: each gets its own results file.
    for name in ("delta_net-1.3B-100B", "other"):
        download = tmp_path / "checkpoints" / name
        assert default_output(download, "niah", ttt=False) == download / "eval-niah.json"


def test_a_sweep_over_length_keeps_every_result(model_dir, capsys):
    """The generated tasks' default results file names the prompts' length: each --length of a sweep has its own."""
    outputs = []
    for length in ("128", "160"):
        code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "mqar", "--num-examples", "1",
                                   "--length", length, "--max-new-tokens", "1")
        assert code == 0, err
        outputs.append(line["output"])
        assert json.loads(Path(line["output"]).read_text())["summary"]["settings"]["length"] == int(length)
    assert outputs == [str(model_dir / "eval-mqar-len128.json"), str(model_dir / "eval-mqar-len160.json")]
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", "--num-examples", "1",
                               "--max-new-tokens", "1")
    assert code == 0, err
    assert line["output"] == str(model_dir / "eval-niah-len512.json")  # the default length, named as well
    kept = model_dir.parent / "run" / "checkpoints" / "step-00000040" / "model"
    assert default_output(kept, "niah", ttt=True, length=4096) == (
        model_dir.parent / "run" / "eval-niah-len4096-ttt-step-00000040.json").resolve()


def test_answer_temperatures_that_sample_nothing_are_refused_by_name(model_dir, capsys):
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", "--set",
                               "eval.answer_temperature=1e-6")
    assert code == 2 and line is None
    assert "eval.answer_temperature=1e-06 is below 0.0001" in err and "use 0 for greedy answers" in err


def test_num_examples_defaults_to_every_row_of_a_task_file(model_dir, tmp_path, capsys):
    rows = [LONGBENCH_ROWS[0] | {"_id": f"hq-{i}"} for i in range(25)]
    data = write_jsonl(tmp_path / "hotpotqa.jsonl", rows)
    argv = ["--model", str(model_dir), "--max-new-tokens", "1", "--output", str(tmp_path / "r.json")]
    code, line, err = run_eval(capsys, *argv, "--task", "longbench", "--data", str(data))
    assert code == 0 and line["num_examples"] == 25, err
    code, line, err = run_eval(capsys, *argv, "--task", "longbench", "--data", str(data), "--num-examples", "3")
    assert code == 0 and line["num_examples"] == 3, err
    code, line, err = run_eval(capsys, *argv, "--task", "mqar", "--length", "128")
    assert code == 0 and line["num_examples"] == 20, err  # synthetic tasks: 20 unless told


def test_ttt_accumulate_option_of_the_command(model_dir, capsys):
    argv = ["--model", str(model_dir), "--task", "mqar", "--num-examples", "2", "--length", "128",
            "--max-new-tokens", "2", "--ttt", "--ttt-steps", "1", "--ttt-accumulate"]
    code, line, err = run_eval(capsys, *argv)
    assert code == 0, err
    assert line["output"] == str(model_dir / "eval-mqar-len128-ttt-accumulate.json")  # not the plain --ttt results file
    assert json.loads((model_dir / "eval-mqar-len128-ttt-accumulate.json").read_text())["summary"]["ttt_config"]["accumulate"]
    code, _, err = run_eval(capsys, *[arg for arg in argv if arg != "--ttt"])
    assert code == 2 and "--ttt-accumulate needs --ttt" in err


def test_ttt_batch_option_of_the_command(model_dir, capsys):
    argv = ["--model", str(model_dir), "--task", "mqar", "--num-examples", "3", "--length", "128",
            "--max-new-tokens", "2", "--ttt", "--ttt-batch", "2", "--set", "train.mini_batches=2"]
    code, line, err = run_eval(capsys, *argv)
    assert code == 0, err
    assert line["output"] == str(model_dir / "eval-mqar-len128-ttt-batch2.json")
    summary = json.loads((model_dir / "eval-mqar-len128-ttt-batch2.json").read_text())["summary"]
    assert summary["ttt_config"]["batch"] == 2 and summary["ttt_config"]["mini_batches"] == 2
    for extra, message in [(["--ttt-accumulate"], "--ttt-batch=2 always carries the adaptation from batch to batch"),
                           (["--ttt-steps", "1"], "--ttt-steps=1 and --ttt-batch=2: a batch takes train.mini_batches"),
                           (["--ttt-batch", "0"], "--ttt-batch must be >= 1, got 0")]:
        code, _, err = run_eval(capsys, *argv, *extra)
        assert code == 2 and message in err, err
    code, _, err = run_eval(capsys, *[arg for arg in argv if arg != "--ttt"])
    assert code == 2 and "--ttt-batch=2 needs --ttt" in err

# ---------------------------------------------------------------- prompts


def test_max_prompt_tokens_option_truncates_and_is_reported(model_dir, tmp_path, capsys):
    output = tmp_path / "r.json"
    code, _, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", "--num-examples", "2",
                            "--length", "320", "--max-new-tokens", "2", "--set", "eval.max_prompt_tokens=120",
                            "--output", str(output))
    assert code == 0, err
    results = json.loads(output.read_text())
    assert results["summary"]["truncated_prompts"] == 2 and "cut in the middle" in err
    assert all(r["prompt_tokens"] == 120 and r["original_prompt_tokens"] > 120 for r in results["examples"])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("task", ["ruler-qa", "longbench"])
def test_missing_data_is_a_clear_error(task, model_dir, capsys):
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", task)
    assert code == 2 and line is None
    assert "--data is required" in err and task in err


@pytest.mark.parametrize("task", ["ruler-qa", "longbench"])
def test_unknown_columns_are_a_clear_error(task, model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"question_text": "Q?", "gold": "A"}])
    code, _, err = run_eval(capsys, "--model", str(model_dir), "--task", task, "--data", str(data))
    assert code == 2
    assert "odd.jsonl" in err and "question_text" in err and "gold" in err  # the fields the file does have
    assert ("'prompt'" in err) if task == "ruler-qa" else ("'answers'" in err)


def test_other_bad_inputs_exit_2_naming_the_value(model_dir, tmp_path, capsys):
    base = ["--model", str(model_dir)]
    code, _, err = run_eval(capsys, *base, "--task", "ruler-qa", "--data", str(tmp_path / "absent.jsonl"))
    assert code == 2 and "absent.jsonl" in err
    not_longbench = write_jsonl(tmp_path / "lb.jsonl", [LONGBENCH_ROWS[0] | {"dataset": "cooking"}])
    code, _, err = run_eval(capsys, *base, "--task", "longbench", "--data", str(not_longbench))
    assert code == 2 and "'cooking' is not a LongBench dataset" in err
    code, _, err = run_eval(capsys, *base, "--task", "niah", "--set", "eval.max_promt_tokens=5")
    assert code == 2 and "eval.max_promt_tokens" in err
    code, _, err = run_eval(capsys, *base, "--task", "niah", "--set", "eval.batch_size=0")
    assert code == 2 and "eval.batch_size" in err and "(got 0)" in err
    code, _, err = run_eval(capsys, *base, "--task", "niah", "--set", "eval.batch_size=[")
    assert code == 2 and "--set eval.batch_size:" in err and "Traceback" not in err
    code, _, err = run_eval(capsys, *base, "--task", "niah", "--length", "40")
    assert code == 2 and "40" in err
    code, _, err = run_eval(capsys, "--model", str(tmp_path), "--task", "niah")
    assert code == 2 and "config.json" in err


def test_bad_options_are_refused_before_any_generation(model_dir, tmp_path, capsys):
    base = ["--model", str(model_dir)]
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q?", "answer": "A"}])
    code, line, err = run_eval(capsys, *base, "--task", "niah", "--data", str(data))
    assert code == 2 and line is None and "--task niah generates its prompts and reads no --data" in err
    code, _, err = run_eval(capsys, *base, "--task", "niah", "--length", "128", "--set",
                            "eval.niah_variant=multiquery")
    assert code == 2 and "--length 128" in err and "too short" in err
    (tmp_path / "results").mkdir()
    code, line, err = run_eval(capsys, *base, "--task", "niah", "--output", str(tmp_path / "results"))
    assert code == 2 and line is None and "--output" in err and "is a directory" in err
    (tmp_path / "a_file").write_text("")
    code, line, err = run_eval(capsys, *base, "--task", "niah", "--output", str(tmp_path / "a_file" / "out.json"))
    assert code == 2 and line is None and "cannot create its directory" in err


def test_an_output_that_is_an_input_file_or_a_model_file_is_refused(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q?", "answer": "A"}])
    files = {path: path.read_bytes() for path in [data, *model_dir.iterdir()] if path.is_file()}
    base = ["--model", str(model_dir), "--task", "ruler-qa", "--data", str(data), "--max-new-tokens", "1"]
    (tmp_path / "linked.jsonl").hardlink_to(data)
    for output, named in [(data, f"is --data {str(data)!r}"), (tmp_path / "linked.jsonl", "is --data"),
                          (model_dir / "config.json", f"is the file 'config.json' of --model {str(model_dir)!r}")]:
        code, line, err = run_eval(capsys, *base, "--output", str(output))
        assert code == 2 and line is None and f"--output {str(output)!r} {named}" in err, err
    assert {path: path.read_bytes() for path in files} == files
    # A results file beside the model is the default output, and is replaced.
    (model_dir / "eval-ruler-qa.json").write_text("{}")
    code, line, err = run_eval(capsys, *base, "--output", str(model_dir / "eval-ruler-qa.json"))
    assert code == 0 and json.loads((model_dir / "eval-ruler-qa.json").read_text())["summary"]


def test_data_skip_bad_rows_skips_and_counts_a_bad_task_row(model_dir, tmp_path, capsys, caplog):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps(RULER_ROWS[0]) + "\n{not json\n" + json.dumps(RULER_ROWS[1]) + "\n")
    base = ["--model", str(model_dir), "--task", "ruler-qa", "--data", str(data), "--max-new-tokens", "2"]
    code, _, err = run_eval(capsys, *base)
    assert code == 2 and "line 2: malformed JSON" in err
    results = tmp_path / "results.json"
    code, line, err = run_eval(capsys, *base, "--set", "data.skip_bad_rows=true", "--output", str(results))
    assert code == 0 and line["num_examples"] == 2 and "skipped 1 bad rows" in caplog.text
    assert json.loads(results.read_text())["summary"]["skipped_bad_rows"] == 1  # recorded, as posttrain.json does
    # --num-examples counts examples: the bad row takes no place among the first 2 (it evaluated 1).
    code, line, err = run_eval(capsys, *base, "--set", "data.skip_bad_rows=true", "--num-examples", "2",
                               "--output", str(results))
    assert code == 0 and line["num_examples"] == 2


def test_eval_scores_longbench_with_the_release_rules_on_request(model_dir, task_files, capsys):
    argv = ["--model", str(model_dir), "--task", "longbench", "--data", str(task_files["longbench"]),
            "--max-new-tokens", "2", "--set", "eval.longbench_scoring=refine-release"]
    code, line, _ = run_eval(capsys, *argv)
    assert code == 0 and line["metric"] == ["classification_score (REFINE release)", "qa_f1_score (REFINE release)"]

# ---------------------------------------------------------------- the model's own tokenizer


def test_eval_refuses_a_tokenizer_whose_eos_is_not_the_models(model_dir, tmp_path, capsys):
    tokenizer_dir = tmp_path / "tok"
    write_gapped_tokenizer(tokenizer_dir, top_id=200)  # fits the model's 260 ids; EOS 2, not 258
    output = tmp_path / "results.json"
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--task", "niah",
                               "--num-examples", "1", "--max-new-tokens", "2", "--output", str(output))
    assert code == 2 and line is None and not output.exists()
    assert (f"--model {str(model_dir)!r} has eos_token_id=258 but tokenizer {str(tokenizer_dir)!r} ends documents "
            f"with id 2: give the model's own tokenizer (--tokenizer DIR)") in err
    model = load_model(model_dir)
    examples = [TaskExample(example_id="q", task="niah", prompt="the cat sat on", answers=["mat"])]
    with pytest.raises(ValueError, match="the model has eos_token_id=258 but tokenizer .* ends documents with id 2"):
        evaluate(model, load_tokenizer(tokenizer_dir), examples, "niah", progress=False)


def test_eval_refuses_a_tokenizer_with_ids_past_the_models_vocabulary(model_dir, tmp_path, capsys):
    tokenizer_dir = tmp_path / "tok"
    write_gapped_tokenizer(tokenizer_dir, top_id=500)  # 12 tokens, but ids up to 500
    code, _, err = run_eval(capsys, "--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--task", "niah",
                            "--num-examples", "1", "--max-new-tokens", "2", "--output", str(tmp_path / "r.json"))
    assert code == 2 and "Traceback" not in err
    assert (f"--model {str(model_dir)!r} has vocab_size=260, smaller than the vocabulary of tokenizer "
            f"{str(tokenizer_dir)!r} (501)") in err
    examples = [TaskExample(example_id="q", task="niah", prompt="the dog sat on", answers=["mat"])]
    with pytest.raises(ValueError, match=r"the model has vocab_size=260, smaller .* \(501\)"):
        evaluate(load_model(model_dir), load_tokenizer(tokenizer_dir), examples, "niah", progress=False)


def test_a_model_path_that_is_not_a_model_directory_is_named_before_the_results_path(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# not a model\n")
    code, line, err = run_eval(capsys, "--model", str(readme), "--task", "niah")
    assert code == 2 and line is None
    assert f"--model {str(readme)!r} is a file, not a model directory (one with config.json)" in err
    assert "results file" not in err and "cannot create its directory" not in err
    absent = tmp_path / "no_such_model"
    code, _, err = run_eval(capsys, "--model", str(absent), "--task", "niah")
    assert code == 2 and f"--model {str(absent)!r} does not exist" in err
    assert not absent.exists()  # the default results path did not create it
    # A mistyped name in the working directory (its parent '.') said "PosixPath('.') has an empty name".
    for typo in ("no_such_model", "/no_such_model"):
        code, _, err = run_eval(capsys, "--model", typo, "--task", "niah")
        assert code == 2 and f"--model {typo!r} does not exist" in err, err
    # A run caught swapping its checkpoint in (latest/ renamed to previous/ first), or killed between.
    previous = tmp_path / "run" / "checkpoints" / "previous" / "model"
    previous.mkdir(parents=True)
    (previous / "config.json").write_text("{}")
    latest = tmp_path / "run" / "checkpoints" / "latest" / "model"
    code, _, err = run_eval(capsys, "--model", str(latest), "--task", "niah")
    assert code == 2 and f"--model {str(latest)!r} does not exist, but {str(previous)!r} does: the run is " in err
    code, _, err = run_eval(capsys, "--model", str(tmp_path), "--task", "niah")
    assert code == 2 and f"--model {str(tmp_path)!r} is not a model directory: it has no config.json" in err
    assert not list(tmp_path.glob("eval-*.json"))


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Loading the weights or building a prompt fails the test: a refused option must come first."""
    def expensive(*args, **kwargs):
        raise AssertionError("reached the model or the prompts")

    for name in ("load_model", "generate_niah", "mqar_for_length"):
        monkeypatch.setattr(runner, name, expensive)


@pytest.mark.parametrize("task", ["niah", "mqar"])
def test_a_length_past_the_limit_is_refused_before_the_model_loads(model_dir, tmp_path, capsys, nothing_expensive,
                                                                    task):
    """--length 100000000 was a traceback: `DefaultCPUAllocator: can't allocate memory: you tried to allocate
    51199997952 bytes`, after about a minute and 4 GB of building prompts."""
    output = tmp_path / "r.json"
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", task, "--length", "100000000",
                               "--output", str(output))
    assert code == 2 and line is None and not output.exists() and "Traceback" not in err
    limit = runner.MAX_SYNTHETIC_LENGTH
    assert err.startswith(f"refine: error: --length 100000000 is more than {limit} tokens, the longest --task {task} "
                          f"prompt: RULER's longest context (128K)")
    assert err.count("\n") == 1


@pytest.mark.parametrize("task", ["niah", "mqar"])
def test_a_synthetic_set_past_its_token_budget_is_refused_before_the_model_loads(model_dir, tmp_path, capsys,
                                                                                   nothing_expensive, task):
    """--num-examples 10**9 would generate a billion prompts before answering the first."""
    output = tmp_path / "r.json"
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", task, "--length", "512",
                               "--num-examples", "1000000000", "--output", str(output))
    assert code == 2 and line is None and not output.exists() and "Traceback" not in err
    budget = runner.MAX_SYNTHETIC_TOKENS
    assert err.startswith(f"refine: error: --num-examples 1000000000 x --length 512 = 512000000000 tokens, more "
                          f"than the {budget} a --task {task} set may hold")
    assert f"at most {budget // 512} at this length" in err
    # The budget holds RULER's 500 examples at 128K; the defaults (20 examples) hold at every length.
    runner.check_synthetic_length(task, runner.MAX_SYNTHETIC_LENGTH, 500)
    runner.check_synthetic_length(task, runner.MAX_SYNTHETIC_LENGTH, None)


def test_a_length_at_the_limit_is_taken(monkeypatch):
    built = []
    monkeypatch.setattr(runner, "mqar_for_length", lambda length, *args, **kwargs: built.append(length) or [])
    args = argparse.Namespace(task="mqar", data=None, seed=0, length=runner.MAX_SYNTHETIC_LENGTH, num_examples=1)
    runner.build_examples(args, TOKENIZER, runner.EvalOptions())
    assert built == [runner.MAX_SYNTHETIC_LENGTH]


def test_an_answer_budget_past_the_limit_is_refused_before_the_model_loads(model_dir, task_files, tmp_path, capsys,
                                                                            nothing_expensive):
    output = tmp_path / "r.json"
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "ruler-qa", "--data",
                               str(task_files["ruler-qa"]), "--max-new-tokens", str(10**12), "--output", str(output))
    assert code == 2 and line is None and not output.exists()
    assert err.startswith(f"refine: error: --max-new-tokens must be in [1, {MAX_GEN_TOKENS}] tokens, got {10**12}")
    examples = [TaskExample(example_id="q", task="niah", prompt="the cat sat on", answers=["mat"])]
    with pytest.raises(ValueError, match=rf"max_new_tokens must be in \[1, {MAX_GEN_TOKENS}\] tokens, got 0"):
        evaluate(load_model(model_dir), TOKENIZER, examples, "niah", max_new_tokens=0, progress=False)

# ---------------------------------------------------------------- bad input: hints, options, rows


def test_the_column_hint_never_fails_and_lists_only_an_objects_field_names(tmp_path):
    """A line nested 100,000 deep raised RecursionError from the hint; a first line holding a list of a 1 MB
    object was printed whole (a 1,000,258-byte error message)."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps([{"k" * 1_000_000: 1}]) + "\n")
    for path in (deep, big):
        assert runner._column_hint(str(path), "ruler-qa") == ""
    wide = write_jsonl(tmp_path / "wide.jsonl", [{f"f{i:03}": 1 for i in range(500)} | {"x" * 10_000: 1}])
    hint = runner._column_hint(str(wide), "longbench")
    assert hint.startswith("; its first row has fields ['f000', 'f001',") and "... (501 in all)" in hint
    assert len(hint) < 1000 and "expects input+context+answers or prompt+answers" in hint


def test_a_deeply_nested_first_line_is_a_one_line_error(model_dir, tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "ruler-qa", "--data", str(deep))
    assert code == 2 and line is None and "Traceback" not in err and "deep.jsonl, line 1" in err


def test_a_cuda_device_without_a_gpu_is_refused_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch,
                                                                       nothing_expensive):
    """It was an AssertionError traceback from moving the loaded weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", "--set", "train.device=cuda",
                               "--output", str(tmp_path / "r.json"))
    assert code == 2 and line is None and "Traceback" not in err
    assert err.startswith("refine: error: train.device='cuda', but this machine has no CUDA GPU")


@pytest.mark.parametrize(("rows", "message"), [
    ([RULER_ROWS[0], RULER_ROWS[0] | {"answer": ["Oslo", "\ud800"]}], "line 2: column 'answer' holds a lone surrogate"),
    ([RULER_ROWS[1] | {"index": "\ud800"}], "line 1: column 'index' holds a lone surrogate"),
], ids=["answer", "index"])
def test_rows_the_results_cannot_hold_are_refused_before_answering_and_keep_earlier_results(
        model_dir, tmp_path, capsys, rows, message):
    """Every answer was generated, then writing failed ('utf-8' codec can't encode) and the earlier results file
    was left empty."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))  # ASCII JSON: "\ud800" escapes
    output = tmp_path / "r.json"
    output.write_text('{"earlier": "results"}')
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "ruler-qa", "--data", str(data),
                               "--max-new-tokens", "2", "--output", str(output))
    assert code == 2 and line is None and f"qa.jsonl, {message}" in err
    assert output.read_text() == '{"earlier": "results"}'


def test_results_that_fail_to_write_leave_the_earlier_file_whole(model_dir, tmp_path, capsys, monkeypatch):
    output = tmp_path / "r.json"
    output.write_text('{"earlier": "results"}')
    summary = {"task": "niah", "num_examples": 1, "score": 0.0, "ttt": False, "seconds": 0.0, "metric": ["m"],
               "note": "\ud800"}  # what a write cannot encode
    monkeypatch.setattr(runner, "evaluate", lambda *args, **kwargs: {"summary": summary, "examples": []})
    monkeypatch.setattr(runner, "build_examples", lambda *args, **kwargs: [])
    code, _, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", "--output", str(output))
    assert code == 2 and "can't encode" in err
    assert output.read_text() == '{"earlier": "results"}'


@pytest.mark.parametrize(("seed", "ttt"), [(2**64 - 1, ["--ttt"]), (2**64, []), (-2**63 - 1, []), (2**63, [])])
def test_a_seed_outside_its_range_is_refused_by_name_before_the_model_loads(model_dir, tmp_path, capsys,
                                                                          nothing_expensive, seed, ttt):
    """'Overflow when unpacking long long', without naming --seed; with --ttt, 2**64 - 1 failed only at the second
    example (--seed + 1)."""
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", "--seed", str(seed), *ttt,
                               "--output", str(tmp_path / "r.json"))
    low, high = answering.SEED_RANGE
    assert code == 2 and line is None and err.startswith(f"refine: error: --seed must be in [{low}, {high}], "
                                                         f"got {seed}")
    examples = [TaskExample(example_id="q", task="niah", prompt="the cat sat on", answers=["mat"])]
    with pytest.raises(ValueError, match=rf"^seed must be in \[{low}, {high}\], got {seed}"):
        evaluate(load_model(model_dir), TOKENIZER, examples, "niah", ttt=bool(ttt), seed=seed, progress=False)


@pytest.mark.parametrize("seed", answering.SEED_RANGE)
def test_every_seed_a_run_derives_from_a_seed_in_range_is_valid(model_dir, tmp_path, capsys, seed):
    for mode in (["--ttt-steps", "1"], ["--ttt-batch", "1"]):
        code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "mqar", "--num-examples", "2",
                                   "--length", "128", "--max-new-tokens", "1", "--seed", str(seed), "--ttt", *mode,
                                   "--output", str(tmp_path / "r.json"))
        assert code == 0, err


@pytest.mark.parametrize(("setting", "problem"), [
    ("eval.answer_temperature=.inf", "eval.answer_temperature: Input should be a finite number"),
    ("eval.answer_temperature=.nan", "eval.answer_temperature: Input should be a finite number"),
    ("eval.answer_temperature=true", "eval.answer_temperature: Value error, must be a number, got the boolean True"),
    ("eval.answer_top_k=true", "eval.answer_top_k: Value error, must be a number, got the boolean True"),
    ("eval.batch_size=true", "eval.batch_size: Value error, must be a number, got the boolean True"),
    ("eval.max_prompt_tokens=false", "eval.max_prompt_tokens: Value error, must be a number, got the boolean False"),
])
def test_eval_options_refuse_infinities_and_booleans_for_numbers(setting, problem):
    """.inf reached the results JSON as Infinity; true was taken as 1."""
    with pytest.raises(runner.ConfigError, match=f"invalid eval option: {problem}"):
        runner.split_overrides([setting])


@pytest.mark.parametrize(("extra", "message"), [
    (["--ttt", "--ttt-batch", "1", "--set", "train.mini_batches=2"],
     "--ttt-batch=1 is smaller than train.mini_batches=2"),
    (["--ttt-steps", "3"], "--ttt-steps=3 needs --ttt"),
    (["--ttt", "--ttt-steps", "100000000000"],
     f"--ttt-steps must be in [0, {answering.MAX_TTT_STEPS}], got 100000000000"),
    (["--ttt", "--ttt-steps", "-1"], f"--ttt-steps must be in [0, {answering.MAX_TTT_STEPS}], got -1"),
], ids=["batch-below-mini-batches", "steps-without-ttt", "steps-past-limit", "negative-steps"])
def test_test_time_options_that_would_be_ignored_clamped_or_endless_are_refused(model_dir, tmp_path, capsys,
                                                                               nothing_expensive, extra, message):
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", *extra,
                               "--output", str(tmp_path / "r.json"))
    assert code == 2 and line is None and err.startswith(f"refine: error: {message}")


@pytest.mark.parametrize("task", ["ruler-qa", "longbench"])
def test_a_length_for_a_task_read_from_a_file_is_refused(model_dir, task_files, tmp_path, capsys, nothing_expensive,
                                                         task):
    for length in ("4096", "512"):  # 512, niah's and mqar's default, too: any --length given is refused
        code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", task, "--data",
                                   str(task_files[task]), "--length", length, "--output", str(tmp_path / "r.json"))
        assert code == 2 and line is None
        assert err.startswith(f"refine: error: --length {length} applies only to --task niah and mqar, which "
                              f"generate their prompts; --task {task} reads them from --data")


@pytest.mark.parametrize("task", ["niah", "ruler-qa", "longbench"])
def test_a_prompt_templates_file_is_refused_when_missing_or_for_another_task(model_dir, task_files, tmp_path,
                                                                            capsys, nothing_expensive, task):
    data = ["--data", str(task_files[task])] if task in task_files else []
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", task, *data, "--set",
                               "eval.prompt_templates=nope.json", "--output", str(tmp_path / "r.json"))
    assert code == 2 and line is None
    assert err.startswith("refine: error: eval.prompt_templates='nope.json' " +
                          ("is not a file" if task == "longbench" else f"is an option of --task longbench, not {task}"))


@pytest.mark.parametrize(("task", "options", "error"), [
    ("ruler-qa", ["eval.niah_variant=multikey"], "eval.niah_variant='multikey' is an option of --task niah, not "
                                                 "ruler-qa"),
    ("niah", ["eval.niah_variant=bogus"], "invalid eval option: eval.niah_variant: Input should be 'single', "),
    ("ruler-qa", ["eval.batch_size=4", "--ttt"], "eval.batch_size=4: --ttt answers each prompt after adapting"),
    ("ruler-qa", ["eval.answer_top_k=5"], "eval.answer_top_k=5 samples among the most likely tokens, but answers "
                                          "are greedy (eval.answer_temperature=0)"),
])
def test_an_eval_option_the_run_would_ignore_is_refused(model_dir, task_files, tmp_path, capsys, nothing_expensive,
                                                       task, options, error):
    data = ["--data", str(task_files[task])] if task in task_files else []
    flags = [flag for option in options for flag in (["--set", option] if "=" in option else [option])]
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", task, *data, *flags,
                               "--output", str(tmp_path / "r.json"))
    assert code == 2 and line is None and err.startswith(f"refine: error: {error}"), err


def test_a_longbench_template_without_the_context_is_refused(model_dir, task_files, tmp_path, capsys):
    templates = tmp_path / "dataset2prompt.json"
    templates.write_text(json.dumps({"hotpotqa": "Answer the question: {input}\nAnswer:"}))
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "longbench", "--data",
                               str(task_files["longbench"]), "--set", f"eval.prompt_templates={templates}",
                               "--output", str(tmp_path / "r.json"))
    assert code == 2 and line is None
    assert f"prompt template for 'hotpotqa' in {str(templates)!r} has no {{context}}" in err


def test_an_empty_class_list_is_refused_showing_it(model_dir, tmp_path, capsys):
    """'needs all_classes ..., got None' for a row that gave []."""
    data = write_jsonl(tmp_path / "trec.jsonl", [LONGBENCH_ROWS[1] | {"all_classes": []}])
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "longbench", "--data", str(data),
                               "--output", str(tmp_path / "r.json"))
    assert code == 2 and line is None
    assert "task 'trec' is a classification task and needs 'all_classes' (a list of class names), got []" in err
    examples = [TaskExample(example_id="t", task="trec", prompt="p", answers=["Human"], all_classes=[])]
    with pytest.raises(ValueError, match=r"needs 'all_classes' .*got \[\]"):
        score_examples("longbench", examples, ["Human"])


@pytest.mark.parametrize("options, words", [
    (["--set", "train.steps=50", "--ttt"], "--set train.steps=50: refine eval does not read train.steps; give --ttt-steps"),
    (["--set", "tokenizer=/elsewhere"], "does not read tokenizer; give --tokenizer"),
    (["--set", "model.hidden_size=32"], "does not read model.hidden_size; give --model"),
    (["--set", "train.seed=3"], "does not read train.seed; give --seed"),
    (["--set", "refine.rollout_len=3"], "does not read refine.rollout_len; it drives --ttt, which is not given"),
    (["--set", "train.micro_batches=2"], "it drives --ttt, which is not given"),
    # With --ttt they were taken and changed nothing: per-prompt updates read neither, nor any schedule.
    (["--ttt", "--set", "train.mini_batches=2"], "--set train.mini_batches=2: train.mini_batches splits the batches "
                                                 "of --ttt-batch N"),
    (["--ttt", "--set", "optim.warmup_steps=5"], "--set optim.warmup_steps=5: test-time training takes no "
                                                 "learning-rate schedule"),
    (["--ttt", "--ttt-batch", "2", "--set", "optim.schedule=cosine"], "takes no learning-rate schedule"),
    # Refused as eval's, not sent to set optim.schedule=cosine by the config's own check (then refused here).
    (["--ttt", "--set", "optim.min_lr_ratio=0.5"], "--set optim.min_lr_ratio=0.5: test-time training takes no "
                                                   "learning-rate schedule"),
    (["--set", "data.source=docs.jsonl"], "does not read data.source; eval reads data.format, data.skip_bad_rows, train.device"),
    (["--config", "configs/ttt.yaml"], "--config configs/ttt.yaml: its refine and optim sections drive --ttt"),
    (["--set", "eval.longbench_scoring=refine-release"], "eval.longbench_scoring='refine-release' is an option of "
                                                         "--task longbench, not niah"),
])
def test_settings_eval_would_not_read_are_refused_naming_what_to_give(model_dir, capsys, monkeypatch, options, words):
    # They changed nothing: a --set train.steps=50 meant as --ttt-steps ran the default 2 updates.
    monkeypatch.chdir(Path(__file__).parents[2])  # configs/ttt.yaml
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "niah", *options)
    assert code == 2 and line is None and words in err, err


def test_what_eval_reads_of_a_run_config_is_accepted(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[2])
    base = ["--model", str(model_dir), "--task", "niah", "--num-examples", "1", "--length", "320",
            "--max-new-tokens", "2"]
    code, _, err = run_eval(capsys, *base, "--set", "train.threads=1", "--set", "train.dtype=float32",
                            "--output", str(tmp_path / "a.json"))
    assert code == 0, err
    code, _, err = run_eval(capsys, *base, "--ttt", "--ttt-steps", "1", "--config", "configs/ttt.yaml", "--set",
                            "optim.lr=1e-5", "--set", "refine.rollout_len=3", "--output", str(tmp_path / "b.json"))
    assert code == 0, err
    # A task file whose name does not tell its format: data.format does (it was refused as not read).
    qa = tmp_path / "qa.data"
    qa.write_text(json.dumps({"prompt": "Q?", "answer": "A"}) + "\n")
    qa_argv = ["--model", str(model_dir), "--task", "ruler-qa", "--data", str(qa), "--max-new-tokens", "1"]
    code, _, err = run_eval(capsys, *qa_argv, "--output", str(tmp_path / "qa.json"))
    assert code == 2 and "or set data.format" in err, err
    code, _, err = run_eval(capsys, *qa_argv, "--set", "data.format=jsonl", "--output", str(tmp_path / "qa.json"))
    assert code == 0, err
    # Margins no document length setting would admit (data.min_length, data.seq_len): eval fits them to each prompt.
    code, _, err = run_eval(capsys, *base, "--ttt", "--ttt-steps", "1", "--set", "refine.margin=300",
                            "--output", str(tmp_path / "margin.json"))
    assert code == 0, err
    # A run's config whose starting checkpoint is gone: eval reads --model, not train.init_from (it was refused).
    moved = tmp_path / "config.yaml"
    # Its data.seq_len is below data.min_length's default, as a posttrain run's may be (neither reads it).
    moved.write_text(f"train:\n  init_from: {tmp_path / 'moved-away'}\noptim:\n  lr: 1.0e-5\ndata:\n  seq_len: 60\n")
    code, _, err = run_eval(capsys, *base, "--ttt", "--ttt-steps", "1", "--config", str(moved),
                            "--output", str(tmp_path / "c.json"))
    assert code == 0, err
    # Its model section, copied from the starting checkpoint's config.json, may hold that checkpoint's dtype (other
    # than the run's train.dtype) and other libraries' keys: eval does not read it (it was refused, naming them).
    moved.write_text(f"train:\n  init_from: {tmp_path / 'moved-away'}\noptim:\n  lr: 1.0e-5\n"
                     f"model:\n  model_type: delta_net\n  torch_dtype: bfloat16\n  my_custom_flag: true\n")
    code, _, err = run_eval(capsys, *base, "--ttt", "--ttt-steps", "1", "--config", str(moved),
                            "--output", str(tmp_path / "c2.json"))
    assert code == 0, err
    # A training run's schedule in the file is said not to apply (--set of it is refused): it was silently flat.
    scheduled = tmp_path / "scheduled.yaml"
    scheduled.write_text("optim:\n  lr: 1.0e-5\n  schedule: cosine\n  warmup_steps: 100\n")
    code, _, err = run_eval(capsys, *base, "--ttt", "--ttt-steps", "1", "--config", str(scheduled),
                            "--output", str(tmp_path / "d.json"))
    assert code == 0 and (f"refine eval: --config {scheduled}: optim.schedule='cosine', optim.warmup_steps=100 not "
                          f"applied: test-time updates take optim.lr=1e-05 as it is") in err, err


def test_the_summary_names_the_checkpoint_step_it_scored_and_a_checkpoint_replaced_while_read_is_refused(
        model_dir, tmp_path, capsys, monkeypatch):
    """checkpoints/latest moves on with a live run: the results file (replaced by the next evaluation of it) said
    neither which step it scored, nor that the checkpoint changed while its files were read."""
    import shutil

    latest = tmp_path / "run" / "checkpoints" / "latest"
    shutil.copytree(model_dir, latest / "model")
    (latest / "program.json").write_text(json.dumps({"program": "refine", "step": 7}))
    argv = ["--model", str(latest / "model"), "--task", "mqar", "--num-examples", "1", "--length", "128",
            "--max-new-tokens", "1"]
    code, line, err = run_eval(capsys, *argv)
    assert code == 0, err
    assert json.loads(Path(line["output"]).read_text())["summary"]["checkpoint_step"] == 7
    load = runner.load_model

    def next_checkpoint_meanwhile(*args, **kwargs):
        (latest / "program.json").write_text(json.dumps({"program": "refine", "step": 8}))
        return load(*args, **kwargs)

    monkeypatch.setattr(runner, "load_model", next_checkpoint_meanwhile)
    code, line, err = run_eval(capsys, *argv)
    assert code == 2 and "the run replaced this checkpoint while it was read (step 7, then 8)" in err, err
    code, line, err = run_eval(capsys, "--model", str(model_dir), "--task", "mqar", "--num-examples", "1",
                               "--length", "128", "--max-new-tokens", "1")
    assert code == 0 and "checkpoint_step" not in json.loads(Path(line["output"]).read_text())["summary"]
