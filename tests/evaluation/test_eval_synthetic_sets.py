"""`refine eval --task niah|mqar` evaluates on its own streams, never the training corpus's, and says which."""

import argparse
import json

import pytest
from eval_helpers import TOKENIZER

from refine.cli import main as cli_main
from refine.config import load_config
from refine.data.stream import _synthetic_texts
from refine.data.synthetic import NiahConfig, generate_niah, mqar_for_length
from refine.evaluation.runner import EvalOptions, build_examples


def training_texts(kind, seed, seq_len):
    config = load_config(None, ["train.mode=ntp", "data.min_length=16", f"data.seq_len={seq_len}",
                                f"train.seed={seed}"])
    return [text for _, text in _synthetic_texts(kind, config, TOKENIZER, 64)]


def cli_args(task, seed=1234, length=512, num_examples=None):
    """`refine eval`'s arguments with the command's defaults (--seed 1234, --length 512, 20 examples)."""
    return argparse.Namespace(task=task, data=None, seed=seed, length=length, num_examples=num_examples)


@pytest.mark.parametrize("seq_len", [480, 512, 544])
def test_default_eval_sets_share_nothing_with_a_run_trained_on_the_same_seed(seq_len):
    """The review's case: train.seed=1234 on synthetic NIAH at seq_len 480, `refine eval` with its defaults."""
    niah_train, mqar_train = training_texts("niah", 1234, seq_len), training_texts("mqar", 1234, seq_len)
    niah = build_examples(cli_args("niah"), TOKENIZER, EvalOptions())
    mqar = build_examples(cli_args("mqar"), TOKENIZER, EvalOptions())
    assert len(niah) == len(mqar) == 20
    questions = [f"{e.question} {' '.join(e.answers)}\n" for e in niah]
    assert not any(q in text for q in questions for text in niah_train)
    assert not any(value in text for e in niah for value in e.answers for text in niah_train)  # 7-digit values
    assert not any(f"{e.question}\nValues: {' '.join(e.answers)}\n" in text for e in mqar for text in mqar_train)
    # Before evaluation had its own streams, the same arguments gave the training documents' questions back.
    old = generate_niah(NiahConfig(length=512, seed=1234), TOKENIZER, 20)
    assert all(any(f"{e.question} {' '.join(e.answers)}\n" in text for text in niah_train) for e in old)
    if seq_len == 544:  # MQAR at the corpus' own length (544 - 32): the same streams gave every document back
        old = mqar_for_length(512, TOKENIZER, 20, 1234)
        assert all(any(f"{e.question}\nValues: {' '.join(e.answers)}\n" in text for text in mqar_train) for e in old)


@pytest.mark.parametrize("task", ["niah", "mqar"])
def test_eval_results_say_which_seed_and_salt_made_the_set(task, model_dir, tmp_path, capsys):
    output = tmp_path / "results.json"
    argv = ["eval", "--model", str(model_dir), "--task", task, "--num-examples", "2", "--length", "320",
            "--max-new-tokens", "1", "--seed", "77", "--no-progress", "--output", str(output)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    results = json.loads(output.read_text())
    assert results["summary"]["synthetic_set"] == {
        "purpose": "eval", "seed": 77, "salt": f"eval/{task}", "streams": f"eval/{task}:77:<index>",
        "training_salt": task}
    settings = {"max_new_tokens": 1, "max_prompt_tokens": None, "length": 320}
    assert results["summary"]["settings"] == settings | ({"niah_variant": "single"} if task == "niah" else {})
    # Example ids name the set too, so that none is a training document's id (e.g. niah_single_77_0).
    prefix = {"niah": "niah_single", "mqar": "mqar"}[task]
    assert [r["id"] for r in results["examples"]] == [f"{prefix}_eval_77_{i}" for i in range(2)]


def test_results_of_task_files_have_no_synthetic_set(model_dir, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": "Q: capital of Norway?\nA:", "answer": ["Oslo"]}) + "\n")
    output = tmp_path / "results.json"
    argv = ["eval", "--model", str(model_dir), "--task", "ruler-qa", "--data", str(data), "--max-new-tokens", "1",
            "--no-progress", "--output", str(output)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert "synthetic_set" not in json.loads(output.read_text())["summary"]
