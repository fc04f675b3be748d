"""Scoring `refine eval`'s answers: the metric task of each example, answers cut where the metric stops reading,
task scores with LongBench's averages and LongBench-E's per-length scores, and gold answers checked before any
generation."""

import pytest
from eval_helpers import TOKENIZER, run_eval, write_jsonl

from refine.data.synthetic import NiahConfig, generate_niah, mqar_for_length
from refine.data.tasks import TaskExample, load_longbench, load_ruler_qa
from refine.evaluation import answering
from refine.evaluation.score import score_predictions
from refine.evaluation.task_scoring import answer_text, metric_task_for, reads_first_line_only, score_examples


# ---------------------------------------------------------------- scoring path


def _task_examples(task: str, task_files) -> list:
    if task == "niah":
        return (generate_niah(NiahConfig(length=320, seed=1), TOKENIZER, 2)
                + generate_niah(NiahConfig(length=600, variant="multivalue", seed=1), TOKENIZER, 2))
    if task == "mqar":
        return mqar_for_length(200, TOKENIZER, 3, seed=1)
    return load_ruler_qa(task_files[task]) if task == "ruler-qa" else load_longbench(task_files[task])


@pytest.mark.parametrize("task", ["niah", "mqar", "ruler-qa", "longbench"])
def test_a_model_that_knows_the_answers_scores_100_and_a_wrong_one_0(task, task_files):
    examples = _task_examples(task, task_files)
    metric_tasks = [metric_task_for(task, ex) for ex in examples]
    # The gold answers as generated text, then EOS; where the metric reads the first line only, the model
    # rambles on after a line break first (answer_text cuts the answer where the metric would).
    generated = [TOKENIZER.encode(", ".join(ex.answers) + ("\nand then zzz" if reads_first_line_only(name) else ""))
                 + [TOKENIZER.eos_id] for ex, name in zip(examples, metric_tasks)]
    assert any(reads_first_line_only(name) for name in metric_tasks) == (task in ("ruler-qa", "longbench"))
    predictions = [answer_text(TOKENIZER, tokens, name) for tokens, name in zip(generated, metric_tasks)]
    summary, scores = score_examples(task, examples, predictions)
    assert summary["score"] == 100.0 and scores == [100.0] * len(examples)
    summary, scores = score_examples(task, examples, ["Qwxz"] * len(examples))
    assert summary["score"] == 0.0 and scores == [0.0] * len(examples)


def test_longbench_e_scores_by_length_reach_the_eval_summary():
    examples = [TaskExample(example_id=str(i), task="hotpotqa_e", prompt="p", answers=["oslo"], length=n)
                for i, n in enumerate([1000, 5000, 9000])]
    summary, _ = score_examples("longbench", examples, ["oslo", "x", "oslo"])
    assert summary["score_by_length"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    trec = TaskExample(example_id="t", task="trec_e", prompt="p", answers=["City"], all_classes=["City", "Food"],
                       length=6000)
    summary, _ = score_examples("longbench", examples + [trec], ["oslo", "x", "oslo", "City"])
    assert "score_by_length" not in summary  # per task: the buckets of two metrics do not mix
    assert summary["by_task"]["hotpotqa_e"]["score_by_length"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    assert summary["by_task"]["trec_e"]["score_by_length"] == {"0-4k": None, "4-8k": 100.0, "8k+": None}


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"dataset": "trec", "all_classes": None, "answers": ["Human"]},
         "task 'trec' is a classification task and needs 'all_classes'"),
        ({"dataset": "passage_retrieval_en", "answers": ["3"]},
         "task 'passage_retrieval_en' needs every gold answer to contain 'Paragraph <n>', got '3'"),
    ],
    ids=["trec-without-classes", "retrieval-without-paragraph"],
)
def test_gold_answers_a_metric_cannot_score_fail_before_generation(bad_row, message, model_dir, tmp_path, capsys,
                                                                   monkeypatch):
    good = {"input": "q?", "context": "c", "answers": ["Paragraph 1"], "dataset": "passage_retrieval_en"}
    data = write_jsonl(tmp_path / "lb.jsonl", [good, good, good | bad_row])
    examples = load_longbench(data)
    expected = f"example 'lb.jsonl:3' ({data}, line 3): {message}"
    with pytest.raises(ValueError) as error:  # the example's own file line, not its place in a metric group
        score_examples("longbench", examples, ["Paragraph 1"] * 3)
    assert str(error.value).startswith(expected)

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started before the examples were checked")

    monkeypatch.setattr(answering, "generate", no_generation)
    monkeypatch.setattr(answering, "adapt_and_answer", no_generation)
    for ttt in ([], ["--ttt"]):
        code, _, err = run_eval(capsys, "--model", str(model_dir), "--task", "longbench", "--data", str(data), *ttt)
        assert code == 2 and expected in err


@pytest.mark.parametrize("metric_task", ["ruler_qa", "trec", "triviaqa", "hotpotqa", "niah_single", "qa_1"])
@pytest.mark.parametrize("raw", ["Oslo", "Oslo\nBergen", "\nOslo", "\n\nOslo\n", "Bergen\nOslo", ""])
def test_cutting_the_answer_never_changes_its_score(metric_task, raw):
    row = {"answers": ["Oslo"], "all_classes": ["Oslo", "Bergen"]}
    cut = answer_text(TOKENIZER, TOKENIZER.encode(raw) + [TOKENIZER.eos_id], metric_task)
    assert "\n" not in cut or metric_task in ("hotpotqa", "niah_single", "qa_1")
    raw_score = score_predictions(metric_task, [row | {"prediction": raw}])[1]
    assert score_predictions(metric_task, [row | {"prediction": cut}])[1] == raw_score
