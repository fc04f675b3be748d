"""Score a file of predictions: `refine score --task NAME --predictions FILE.jsonl [--output PER_EXAMPLE.jsonl]`.

Each input line is a JSON object with the prediction ("prediction", or "pred" as LongBench and RULER write
it), the gold answers ("answers"; also "outputs" / "answer" as RULER and the REFINE data name them) and, for
classification tasks, "all_classes". An optional "length" adds LongBench-E's per-length scores.
The summary (JSON, printed) holds the task score as the benchmark reports it (mean x 100, 2 decimals).
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refine.evaluation.metrics import (
    FuzzBackend, LongBenchScoring, aggregate_by_length, longbench_task_name, task_metric,
)
from refine.files import check_output_is_a_file_path, check_output_spares_inputs, write_output

PREDICTION_FIELDS = ("prediction", "pred")
ANSWER_FIELDS = ("answers", "outputs", "answer")
ID_FIELDS = ("_id", "id", "index")  # a row's own identifier, carried into the per-example scores


class PredictionRowError(ValueError):
    """A prediction row is missing a field or holds a value of the wrong type; names row and field."""


def _pick(row: dict[str, Any], names: Sequence[str], where: str, must_agree: bool = False) -> tuple[str, Any]:
    """The first of the alternative fields `names` that `row` has. must_agree: two of them with different values
    are refused (scoring one would be a guess)."""
    present = [name for name in names if name in row]
    if not present:
        raise PredictionRowError(f"{where}: none of the fields {list(names)} present; fields: {sorted(row)}")
    first = present[0]
    for other in present[1:] if must_agree else ():
        if row[other] != row[first]:
            raise PredictionRowError(f"{where}: fields {first!r} and {other!r} are alternatives but differ "
                                     f"({row[first]!r:.60} and {row[other]!r:.60}): keep one")
    return first, row[first]


def _as_answers(value: Any, field: str, where: str) -> list[str]:
    answers = [value] if isinstance(value, str) else value  # a string is a single gold answer
    if not (isinstance(answers, list) and all(isinstance(item, str) for item in answers)):
        raise PredictionRowError(f"{where}: field {field!r} must be a list of strings, got {value!r:.120}")
    if not answers:
        raise PredictionRowError(f"{where}: field {field!r} is an empty list: give at least one answer")
    # An empty gold answer is a substring of every prediction: it would score any answer as right.
    if any(not answer.strip() for answer in answers):
        raise PredictionRowError(f"{where}: field {field!r} holds an empty or whitespace gold answer: {value!r:.120}")
    return list(answers)


def score_predictions(
    task: str,
    rows: list[dict[str, Any]],
    *,
    all_classes: list[str] | None = None,
    code_backend: FuzzBackend = "difflib",
    row_names: Sequence[str] | None = None,
    longbench_scoring: LongBenchScoring = "longbench",
) -> tuple[dict[str, Any], list[float]]:
    """Score every row with the task's benchmark rule. Returns (summary, per-example scores in [0, 1]).

    `all_classes` is the fallback class list for classification tasks when a row has none.
    `row_names` name the rows in errors (e.g. "preds.jsonl, line 3"); default "row <index>"."""
    metric = task_metric(task, code_backend, longbench_scoring)
    if not rows:
        raise ValueError(f"no predictions to score for task {task!r}")
    if row_names is not None and len(row_names) != len(rows):
        raise ValueError(f"{len(row_names)} row names for {len(rows)} rows")
    scores: list[float] = []
    lengths: list[int] = []
    empty_predictions = 0
    for row_number, row in enumerate(rows):
        where = row_names[row_number] if row_names is not None else f"row {row_number}"
        if not isinstance(row, dict):
            raise PredictionRowError(f"{where}: expected a JSON object, got {type(row).__name__}")
        prediction_field, prediction = _pick(row, PREDICTION_FIELDS, where, must_agree=True)
        if prediction is None:
            prediction = ""  # a generation that produced nothing
        if not isinstance(prediction, str):
            raise PredictionRowError(f"{where}: field {prediction_field!r} must be a string, got {prediction!r:.120}")
        answer_field, raw_answers = _pick(row, ANSWER_FIELDS, where)
        answers = _as_answers(raw_answers, answer_field, where)
        classes = row.get("all_classes")
        if classes is None:  # no field, or null: none given
            classes = all_classes
        problem = metric.gold_problem(answers, classes)
        if problem is not None:
            raise PredictionRowError(f"{where}: {problem}")
        empty_predictions += int(not prediction.strip())
        scores.append(float(metric.score(prediction, answers, classes)))
        length = _length(row.get("length"), where)
        if length is not None:
            lengths.append(length)
    summary: dict[str, Any] = {
        "task": metric.task,
        "metric": metric.metric,
        "score": metric.task_score(scores),
        "num_examples": len(scores),
        "empty_predictions": empty_predictions,
    }
    if longbench_task_name(metric.task) is None:  # LongBench-E's word-count buckets mean nothing for RULER's tokens
        return summary, scores
    if len(lengths) == len(scores):
        summary["score_by_length"] = aggregate_by_length(scores, lengths)
    elif lengths:  # LongBench-E's buckets need every row's length: say why they are missing
        summary["rows_without_length"] = len(scores) - len(lengths)
    return summary, scores


def _length(value: Any, where: str) -> int | None:
    """A row's LongBench-E context length (words): an integer >= 0 (an integral float, as a dataframe export
    writes it, too), or None when the row has none."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:  # a negative one falls in no bucket
        raise PredictionRowError(f"{where}: field 'length' must be an integer >= 0, got {value!r:.60}")
    return value


def read_jsonl_lines(path: str | Path) -> list[tuple[dict[str, Any], int]]:
    """(row, its line number in the file) for each non-blank line, so errors can name the file line."""
    rows: list[tuple[dict[str, Any], int]] = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows start files with one
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                message = f"{path}, line {line_number}: undecodable UTF-8 at byte {error.start}"
                raise PredictionRowError(message) from None
            except json.JSONDecodeError as error:
                raise PredictionRowError(f"{path}, line {line_number}: malformed JSON ({error.msg})") from None
            except (ValueError, RecursionError) as error:
                # Valid JSON that Python cannot hold: an integer past the int-string limit, nesting past the stack.
                raise PredictionRowError(f"{path}, line {line_number}: unreadable JSON ({error})") from None
            if not isinstance(row, dict):
                message = f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}"
                raise PredictionRowError(message)
            rows.append((row, line_number))
    return rows


def read_class_list(path: str | Path) -> list[Any]:
    """The --all-classes file: a JSON list of class names."""
    try:
        classes = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ValueError(f"--all-classes file {str(path)!r}: undecodable UTF-8 at byte {error.start}") from None
    except (ValueError, RecursionError) as error:
        raise ValueError(f"--all-classes file {str(path)!r}: unreadable JSON ({error})") from None
    if not isinstance(classes, list):
        raise ValueError(f"--all-classes file {str(path)!r} must hold a JSON list of class names")
    return classes


def check_ids(row: dict[str, Any], where: str) -> None:
    """Refuse an identifier the per-example scores could not write: one holding a lone surrogate ("\\ud800" in
    JSON), which is not UTF-8, or NaN or Infinity, which strict JSON has not."""
    for key in ID_FIELDS:
        if key in row:
            try:
                json.dumps(row[key], ensure_ascii=False, allow_nan=False).encode("utf-8")
            except ValueError as error:
                if not isinstance(error, UnicodeEncodeError):
                    raise PredictionRowError(f"{where}: field {key!r} holds NaN or Infinity, which JSON has not: "
                                             f"{row[key]!r:.80}") from None
                surrogate = error.object[error.start]
                raise PredictionRowError(f"{where}: field {key!r} holds a lone surrogate {surrogate!r}, not encodable "
                                         f"as UTF-8: {row[key]!r:.80}") from None


def write_scores(path: str | Path, numbered: list[tuple[dict[str, Any], int]], scores: list[float]) -> None:
    """Per-example scores (`scores` in [0, 1]) as JSON lines, on the summary's scale (x 100), as `refine eval`
    writes its examples' scores: `row` counts the file's rows from 0, `line` is the file line (from 1, blank lines
    counted) and the row's own identifier is carried when it has one. Written whole or not at all: a failure leaves
    an earlier file as it was."""
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, ((row, line_number), score) in enumerate(zip(numbered, scores)):
        record: dict[str, Any] = {"row": index, "line": line_number, "score": 100.0 * score}
        for key in ID_FIELDS:
            if key in row:
                record[key] = row[key]
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_output(output, "".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refine score", description="Score predictions with a benchmark's own metric (LongBench, RULER)."
    )
    parser.add_argument("--task", required=True, help="task name, e.g. hotpotqa, gov_report, trec, ruler_qa, niah")
    parser.add_argument("--predictions", required=True, help="JSON lines: prediction, answers, optional all_classes")
    parser.add_argument("--output", help="write per-example scores here (JSON lines)")
    parser.add_argument("--all-classes", help="JSON file with a list of class names, for rows without all_classes")
    parser.add_argument(
        "--code-sim-backend",
        choices=["difflib", "levenshtein"],
        default="difflib",
        help="fuzzy ratio for lcc / repobench-p: difflib as LongBench pins it, or the scores fuzzywuzzy gives with "
             "python-Levenshtein installed (computed with rapidfuzz)",
    )
    parser.add_argument(
        "--longbench-scoring",
        choices=["longbench", "refine-release"],
        default="longbench",
        help="LongBench's own rules, or the paper release's (first-line QA answers, a fixed trec class list)",
    )
    return parser


def unused_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that the task's metric does not read, each with why (they were taken without a word)."""
    metric = task_metric(args.task, args.code_sim_backend, args.longbench_scoring)
    unused = []
    if args.all_classes and not metric.needs_all_classes:
        unused.append(f"--all-classes unused: {args.task}'s metric ({metric.metric}) takes no class list")
    if args.code_sim_backend != "difflib" and not metric.metric.startswith("code_sim_score"):
        unused.append(f"--code-sim-backend unused: {args.task}'s metric ({metric.metric}) is not code similarity")
    if args.longbench_scoring != "longbench" and longbench_task_name(args.task) is None:
        unused.append(f"--longbench-scoring unused: {args.task} is not a LongBench dataset")
    return unused


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for line in unused_flags(args):
            print(f"refine score: {line}", file=sys.stderr)
        numbered = read_jsonl_lines(args.predictions)
        rows = [row for row, _ in numbered]
        row_names = [f"{args.predictions}, line {line_number}" for _, line_number in numbered]
        if args.output:  # before scoring: a row the per-example scores cannot hold fails naming its line
            for row, name in zip(rows, row_names):
                check_ids(row, name)
        if args.output:
            check_output_is_a_file_path(args.output, "--output")
        if args.output and Path(args.output).is_dir():  # refused before scoring, not after
            raise ValueError(f"--output {args.output!r} is a directory; give a file path")
        if args.output:
            check_output_spares_inputs(args.output, {"--predictions": args.predictions,
                                                     "--all-classes": args.all_classes})
        all_classes = None
        if args.all_classes:
            all_classes = read_class_list(args.all_classes)
        summary, scores = score_predictions(
            args.task, rows, all_classes=all_classes, code_backend=args.code_sim_backend, row_names=row_names,
            longbench_scoring=args.longbench_scoring,
        )
    except (OSError, ValueError) as error:
        print(f"refine score: error: {error}", file=sys.stderr)
        return 2
    summary["predictions"] = str(args.predictions)
    if args.output:
        try:
            write_scores(args.output, numbered, scores)
        except OSError as error:  # the summary still reaches stdout: the scoring is not lost
            print(json.dumps(summary, ensure_ascii=False))
            print(f"refine score: error: --output {args.output!r}: {error}", file=sys.stderr)
            return 2
        summary["per_example"] = str(args.output)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
