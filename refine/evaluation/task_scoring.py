"""Scoring `refine eval`'s answers as each example's benchmark defines it: which task's metric scores an example
(`metric_task_for`), the answer text that metric reads (`answer_text`: cut at the first line break where the metric
reads only the first line), and the task score of a set of answers (`score_examples`, with LongBench's macro
average over datasets and LongBench-E's per-length scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refine.data.tasks import TaskExample
from refine.evaluation.metrics import LONGBENCH_FIRST_LINE_TASKS, LongBenchScoring, longbench_task_name
from refine.evaluation.score import score_predictions
from refine.tokenizer import Tokenizer


def example_name(example: TaskExample) -> str:
    """How errors name an example: its id and, for one read from a file, the file and line it came from."""
    source = example.metadata.get("source")
    return f"example {example.example_id!r}" + (f" ({source})" if isinstance(source, str) else "")


def metric_task_for(task: str, example: TaskExample) -> str:
    """The task name whose metric scores this example.

    CLI task names pick by source: niah/mqar use the example's own task; ruler-qa keeps RULER QA names
    (ruler_*qa, qa, qa_1, qa_2) and scores anything else as ruler_qa; longbench requires a LongBench dataset.
    Any other `task` is a metric task name used for every example."""
    if task in ("niah", "mqar"):
        return example.task
    if task == "ruler-qa":
        name = example.task
        ruler_name = name in ("qa", "qa_1", "qa_2") or (name.startswith("ruler_") and name.endswith("qa"))
        return name if ruler_name else "ruler_qa"
    if task == "longbench":
        if longbench_task_name(example.task) is None:
            raise ValueError(
                f"{example_name(example)}: task {example.task!r} is not a LongBench dataset; give rows a "
                f"'dataset' field (e.g. hotpotqa) or name the file after the dataset"
            )
        return example.task
    return task


def reads_first_line_only(metric_task: str) -> bool:
    """Whether the task's metric looks only at the prediction's first line (RULER QA as REFINE scores it,
    LongBench's few-shot tasks)."""
    name = metric_task.strip()
    ruler_qa = name == "ruler_qa" or (name.startswith("ruler_") and name.endswith("qa"))
    return ruler_qa or longbench_task_name(name) in LONGBENCH_FIRST_LINE_TASKS


def answer_text(tokenizer: Tokenizer, tokens: Sequence[int], metric_task: str) -> str:
    """Decode an answer (generation already stopped at EOS) and stop it at the first line break when the
    metric reads the first line only, exactly where the metric itself would cut it."""
    text = tokenizer.decode(list(tokens))
    if not reads_first_line_only(metric_task):
        return text
    if longbench_task_name(metric_task) is not None:
        text = text.lstrip("\n")  # LongBench skips leading newlines before taking the first line
    return text.split("\n")[0]


def score_examples(task: str, examples: Sequence[TaskExample], predictions: Sequence[str],
                   longbench_scoring: LongBenchScoring = "longbench") -> tuple[dict, list[float]]:
    """Score predictions with each example's benchmark metric. Returns (summary, per-example scores x 100).

    The summary's score is the benchmark's task score (mean x 100); with several tasks (a LongBench file
    mixing datasets) it is their macro average, as LongBench reports averages, and `by_task` holds each.
    When every example has a length, `score_by_length` holds LongBench-E's per-length scores (in `by_task`
    per task when there are several); when only some have one, `rows_without_length` counts the others."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if not examples:
        raise ValueError("no examples to score")
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(metric_task_for(task, example), []).append(index)
    scores = [0.0] * len(examples)
    by_task: dict[str, dict[str, Any]] = {}
    for name, indices in groups.items():
        rows = []
        for i in indices:
            row: dict[str, Any] = {"prediction": predictions[i], "answers": examples[i].answers}
            if examples[i].all_classes is not None:  # [] too: a classification task refuses it showing []
                row["all_classes"] = examples[i].all_classes
            if examples[i].length is not None:
                row["length"] = examples[i].length
            rows.append(row)
        summary, group_scores = score_predictions(name, rows, row_names=[example_name(examples[i]) for i in indices],
                                                  longbench_scoring=longbench_scoring)
        by_task[name] = summary
        for i, value in zip(indices, group_scores):
            scores[i] = 100.0 * value
    task_scores = [s["score"] for s in by_task.values()]
    result: dict[str, Any] = {
        "score": round(sum(task_scores) / len(task_scores), 2),
        "metric": sorted({s["metric"] for s in by_task.values()}),
        "empty_predictions": sum(s["empty_predictions"] for s in by_task.values()),
    }
    by_length = ("score_by_length", "rows_without_length")  # LongBench-E's buckets, or why they are missing
    if len(by_task) > 1:
        result["by_task"] = {
            name: {"score": s["score"], "num_examples": s["num_examples"]} | {k: s[k] for k in by_length if k in s}
            for name, s in by_task.items()
        }
    else:
        (only,) = by_task.values()
        result |= {k: only[k] for k in by_length if k in only}
    return result, scores
