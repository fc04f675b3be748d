"""Task examples (prompt, gold answers) for post-training, test-time training and evaluation.

Loaders:
- `load_ruler_qa`: RULER QA as the REFINE release ships it (columns prompt, answer = list of accepted
  answers, task), or RULER's own output (input, outputs, answer_prefix).
- `load_longbench`: LongBench's released rows (input, context, answers, all_classes, dataset, length,
  _id), or rows with a ready "prompt" and "answers" (the REFINE release's preprocessed LongBench).
- `load_task_examples` / `save_task_examples`: this module's own JSON-lines format.

Answer budgets (`TaskExample.max_new_tokens`): a row's `max_gen_tokens` (the REFINE release's column; one
past MAX_GEN_TOKENS makes a bad row), else LongBench's per-dataset budget, else none (the evaluation default,
32 tokens, RULER QA's and the paper's).
The release's `max_answer_length` column is the gold answer's own length in tokens: generating up to it
would tell the model how long the right answer is, so it is not read.

Sources are JSON lines, parquet or `save_to_disk` folders, read with refine.data.readers, so bad input
behaves the same: a malformed row raises naming its file and row, or is logged, counted and skipped
with `skip_bad_rows`.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refine.data.formats import detect_format
from refine.data.readers import Row, RowSource
from refine.data.sources import BadRowPolicy, DataSourceError, MissingColumnError, require_text

logger = logging.getLogger(__name__)

# The longest answer budget a row may give (max_gen_tokens). Answers are decoded one model step per token, and
# budgets run to LongBench's 512 (its summaries); 128 times that still covers long-form writing, while a slip
# such as a character count or 10**12 would keep the decode loop going for hours or forever.
MAX_GEN_TOKENS = 65_536


# The answer budget of an example that gives none (refine eval's default; --max-new-tokens overrides every budget).
DEFAULT_MAX_NEW_TOKENS = 32


class TaskExample(BaseModel):
    """One task instance. `prompt` is the whole model input; `context` / `question` are its parts when the
    source keeps them apart (post-training cuts a long prompt in the context's middle)."""

    model_config = ConfigDict(extra="forbid")

    example_id: str
    task: str
    prompt: str
    answers: list[str] = Field(min_length=1)
    context: str | None = None
    question: str | None = None
    all_classes: list[str] | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_GEN_TOKENS)  # answer budget in tokens, when given
    length: int | None = Field(None, ge=0)  # the source's own length measure (LongBench: words or characters)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("answers")
    @classmethod
    def _answers_have_text(cls, answers: list[str]) -> list[str]:
        # An empty gold answer is a substring of every prediction: it would score any answer as right.
        blank = next((index for index, answer in enumerate(answers) if not answer.strip()), None)
        if blank is not None:
            raise ValueError(f"gold answer {blank} is empty or whitespace ({answers[blank]!r}): give it text")
        return answers


class LoadReport(BaseModel):
    """What a loader read and skipped."""

    examples: int = 0
    bad_rows: int = 0


# The generic LongBench prompt used when no per-dataset template is given. For LongBench's published
# prompts pass its config/dataset2prompt.json as `prompt_templates`.
DEFAULT_LONGBENCH_TEMPLATE = (
    "Read the text below and answer the request that follows it. Reply with the answer only.\n\n"
    "{context}\n\nRequest: {input}\nAnswer:"
)


# LongBench's answer budget per dataset (its config/dataset2maxlen.json: long ones for summaries), used for
# rows that give no max_gen_tokens. Its ROUGE and F1 scores assume answers may run this long.
LONGBENCH_MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}


def _answers(value: Any, field: str, row: Row, policy: BadRowPolicy) -> list[str] | None:
    answers = [value] if isinstance(value, str) else value
    if not (isinstance(answers, (list, tuple)) and answers and all(isinstance(item, str) for item in answers)):
        policy.reject(row.location, f"field {field!r} must be a non-empty list of strings, got {value!r:.120}")
        return None
    # A lone surrogate ("\ud800" in JSON) is not UTF-8: eval would fail writing its results, every answer generated.
    if any(require_text(answer, field, row.location, policy) is None for answer in answers):
        return None
    # An empty gold answer is a substring of every prediction: it would score any answer as right.
    if any(not answer.strip() for answer in answers):
        policy.reject(row.location, f"field {field!r} holds an empty or whitespace gold answer: {value!r:.120}")
        return None
    return list(answers)


def _prompt_text(value: Any, field: str, row: Row, policy: BadRowPolicy) -> str | None:
    """A prompt or context: text with something in it (an empty one is a broken row, not a hard example)."""
    text = require_text(value, field, row.location, policy)
    if text is not None and not text.strip():
        policy.reject(row.location, f"field {field!r} is empty or whitespace: {text!r:.40}")
        return None
    return text


def _example_id(value: Any, field: str, row: Row, policy: BadRowPolicy) -> tuple[bool, str]:
    """A row's id as text, else its place in the source; a text id must be writable to the results (UTF-8)."""
    if value is None:
        return True, row.doc_id
    if isinstance(value, str) and require_text(value, field, row.location, policy) is None:
        return False, ""
    return True, str(value)


def _optional_text(value: Any, field: str, row: Row, policy: BadRowPolicy) -> tuple[bool, str | None]:
    """An optional text field: None when absent or null; any other non-text value makes a bad row."""
    if value is None:
        return True, None
    text = require_text(value, field, row.location, policy)
    return text is not None, text


def _optional_int(value: Any, field: str, row: Row, policy: BadRowPolicy,
                  minimum: int = 0, maximum: int | None = None) -> tuple[bool, int | None]:
    if value is None:
        return True, None
    if isinstance(value, float) and value.is_integer():  # a dataframe export writes a column with nulls as floats
        value = int(value)
    if (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum)):
        return True, value
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    policy.reject(row.location, f"field {field!r} must be an integer {bounds} or null, got {value!r:.80}")
    return False, None


def _dataset_name(values: Mapping[str, Any], row: Row, policy: BadRowPolicy, fallback: str | None) -> str | None:
    """A LongBench row's dataset: its 'dataset' field, else its 'task', else `fallback` (the file's name). A field
    that is there must name one: an empty or non-text one is refused, not passed over for the file's name."""
    for field in ("dataset", "task"):
        value = values.get(field)
        if value is None:
            continue
        if isinstance(value, str) and value.strip():
            return value
        policy.reject(row.location, f"field {field!r} must name the LongBench dataset (e.g. 'hotpotqa'), got "
                                    f"{value!r:.60}")
        return None
    if fallback is None:
        policy.reject(row.location, "no dataset name: set `dataset`, or give rows a 'dataset' field")
    return fallback


def _answer_budget(values: Mapping[str, Any], row: Row, policy: BadRowPolicy) -> tuple[bool, int | None]:
    """A row's max_gen_tokens: None when it gives none; refused past MAX_GEN_TOKENS (see there)."""
    return _optional_int(values.get("max_gen_tokens"), "max_gen_tokens", row, policy, minimum=1,
                         maximum=MAX_GEN_TOKENS)


def _optional_classes(value: Any, row: Row, policy: BadRowPolicy) -> tuple[bool, list[str] | None]:
    if value is None:
        return True, None
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return True, list(value)
    policy.reject(row.location, f"field 'all_classes' must be a list of strings or null, got {value!r:.120}")
    return False, None


def _check_schema(source: RowSource, alternatives: list[list[str]], where: str) -> None:
    """For sources with a schema, fail early when no accepted column set is complete."""
    present = source.schema_columns()
    if present is None:
        return
    if any(all(column in present for column in columns) for columns in alternatives):
        return
    best = max(alternatives, key=lambda columns: sum(column in present for column in columns))
    missing = next(column for column in best if column not in present)
    raise MissingColumnError(missing, present, where)


def _open(path: str | Path, columns: list[str], fmt: str, policy: BadRowPolicy, split: str | None) -> RowSource:
    if (detect_format(path) if fmt == "auto" else fmt) == "text":
        raise DataSourceError(f"task data must be JSON lines, parquet or save_to_disk, not text: {str(path)!r}")
    return RowSource(path, columns=[], optional_columns=columns, fmt=fmt, policy=policy, split=split)


def _rows_until(source: RowSource, examples: list[TaskExample], limit: int | None) -> Iterator[Row]:
    """The source's rows until `examples` holds `limit` of them (None: every row): a loader's limit counts
    examples, so a bad row it skips takes no place among the first `limit`."""
    for row in source.rows():
        if limit is not None and len(examples) >= limit:
            return
        yield row


def _finish(examples: list[TaskExample], policy: BadRowPolicy, path: str | Path, report: LoadReport | None) -> None:
    if report is not None:
        report.examples, report.bad_rows = len(examples), policy.count
    if policy.count:
        logger.warning("skipped %d bad rows of %s", policy.count, path)
    if not examples:
        raise DataSourceError(f"no task example could be read from {str(path)!r} ({policy.count} bad rows skipped)")


RULER_COLUMNS = [
    "prompt", "answer", "answers", "max_gen_tokens", "task", "index", "input", "outputs", "answer_prefix", "length",
]


def load_ruler_qa(
    path: str | Path,
    *,
    fmt: str = "auto",
    skip_bad_rows: bool = False,
    limit: int | None = None,
    task: str | None = None,
    split: str | None = None,
    report: LoadReport | None = None,
) -> list[TaskExample]:
    """RULER QA examples. `task` overrides the rows' task name; by default it is the row's, else, for rows in
    RULER's own format (input, outputs), RULER's task ("qa_1" / "qa_2" when the file or its folder is named
    so, else "qa": scored with RULER's QA metric), else "ruler_qa" (the paper's first-line scoring)."""
    policy = BadRowPolicy(skip_bad_rows)
    path_names = {Path(path).stem, Path(path).parent.name} if Path(path).is_file() else {Path(path).name}
    ruler_task = next((name for name in ("qa_1", "qa_2") if name in path_names), "qa")
    source = _open(path, RULER_COLUMNS, fmt, policy, split)
    _check_schema(
        source, [["prompt", "answer"], ["prompt", "answers"], ["input", "outputs"]], f"RULER QA source {str(path)!r}"
    )
    examples: list[TaskExample] = []
    for row in _rows_until(source, examples, limit):
        values = row.values
        if "prompt" in values:
            prompt = _prompt_text(values["prompt"], "prompt", row, policy)
            answer_field, default_task = ("answer" if "answer" in values else "answers"), "ruler_qa"
        elif "input" in values:
            # RULER's own output: the answer prefix is part of what the model is given.
            prompt = _prompt_text(values["input"], "input", row, policy)
            if prompt is not None:
                ok, prefix = _optional_text(values.get("answer_prefix"), "answer_prefix", row, policy)
                prompt = (prompt + (prefix or "")) if ok else None
            answer_field, default_task = "outputs", ruler_task
        else:
            policy.reject(row.location, f"needs 'prompt' (or RULER's 'input'); fields present: {sorted(values)}")
            continue
        if prompt is None:
            continue
        if answer_field not in values:
            wanted = "'answer' (or 'answers')" if answer_field == "answers" else repr(answer_field)
            policy.reject(row.location, f"field {wanted} missing; fields present: {sorted(values)}")
            continue
        answers = _answers(values[answer_field], answer_field, row, policy)
        ok_max, max_new_tokens = _answer_budget(values, row, policy)
        ok_task, row_task = _optional_text(values.get("task"), "task", row, policy)
        ok_id, example_id = _example_id(values.get("index"), "index", row, policy)
        if answers is None or not (ok_max and ok_task and ok_id):
            continue
        examples.append(
            TaskExample(
                example_id=example_id,
                task=task or row_task or default_task,
                prompt=prompt,
                answers=answers,
                max_new_tokens=max_new_tokens or None,
                metadata={"source": row.location},
            )
        )
    _finish(examples, policy, path, report)
    return examples


LONGBENCH_COLUMNS = [
    "input", "context", "answers", "all_classes", "dataset", "length", "_id", "language", "prompt", "task",
    "max_gen_tokens",
]


def _template_fields(template: str) -> set[str]:
    """The template's replacement fields; refuses fields other than plain names: `{context.upper}` or
    `{context[0]}` would fill the prompt with an attribute or a character instead of the text."""
    fields = set()
    for _literal, field, _spec, _conversion in string.Formatter().parse(template):
        if field is not None and not field.isidentifier():
            raise ValueError(f"replacement field {{{field}}} is not a plain field name")
        if field is not None:
            fields.add(field)
    return fields


def _read_templates(prompt_templates: Mapping[str, str] | str | Path | None) -> dict[str, str]:
    if prompt_templates is None:
        return {}
    if isinstance(prompt_templates, Mapping):
        return dict(prompt_templates)
    file = Path(prompt_templates)
    try:
        templates = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataSourceError(f"cannot read prompt templates {str(file)!r}: {error}") from error
    if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
        raise DataSourceError(f"prompt templates {str(file)!r} must be a JSON object of dataset -> template string")
    return templates


def load_longbench(
    path: str | Path,
    *,
    dataset: str | None = None,
    prompt_template: str | None = None,
    prompt_templates: Mapping[str, str] | str | Path | None = None,
    fmt: str = "auto",
    skip_bad_rows: bool = False,
    limit: int | None = None,
    split: str | None = None,
    report: LoadReport | None = None,
) -> list[TaskExample]:
    """LongBench examples. The dataset name is `dataset`, else the row's "dataset" / "task", else the file
    name (LongBench names its files after the dataset). Rows without a "prompt" get one from
    `prompt_template`, else `prompt_templates[dataset]` (a dict or a JSON file such as LongBench's
    dataset2prompt.json), else DEFAULT_LONGBENCH_TEMPLATE; templates use {context} and {input}. A row's answer
    budget is its max_gen_tokens, else LongBench's for the dataset (LONGBENCH_MAX_NEW_TOKENS)."""
    templates = _read_templates(prompt_templates)
    templates_name = repr(str(prompt_templates)) if isinstance(prompt_templates, (str, Path)) else "prompt_templates"
    policy = BadRowPolicy(skip_bad_rows)
    source = _open(path, LONGBENCH_COLUMNS, fmt, policy, split)
    _check_schema(source, [["input", "context", "answers"], ["prompt", "answers"]], f"LongBench source {str(path)!r}")
    fallback_name = Path(path).stem if Path(path).is_file() else None
    examples: list[TaskExample] = []
    for row in _rows_until(source, examples, limit):
        values = row.values
        name = dataset or _dataset_name(values, row, policy, fallback_name)
        if name is None:
            continue
        if "answers" not in values:
            policy.reject(row.location, f"field 'answers' missing; fields present: {sorted(values)}")
            continue
        answers = _answers(values["answers"], "answers", row, policy)
        if answers is None:
            continue
        ok_classes, all_classes = _optional_classes(values.get("all_classes"), row, policy)
        ok_length, length = _optional_int(values.get("length"), "length", row, policy)
        ok_max, max_new_tokens = _answer_budget(values, row, policy)
        ok_id, example_id = _example_id(values.get("_id"), "_id", row, policy)
        if not (ok_classes and ok_length and ok_max and ok_id):
            continue
        context = question = None
        if "prompt" in values:
            prompt = _prompt_text(values["prompt"], "prompt", row, policy)
        else:
            missing = [field for field in ("input", "context") if field not in values]
            if missing:
                policy.reject(
                    row.location, f"field {missing[0]!r} missing and no 'prompt'; fields present: {sorted(values)}"
                )
                continue
            # An empty "input" is normal: LongBench's summarization and code datasets have no question.
            question = require_text(values["input"], "input", row.location, policy)
            context = _prompt_text(values["context"], "context", row, policy) if question is not None else None
            if question is None or context is None:
                continue
            template = prompt_template or templates.get(name) or templates.get(name.removesuffix("_e"))
            origin = "prompt_template" if prompt_template else templates_name  # the default template is sound
            template = template or DEFAULT_LONGBENCH_TEMPLATE
            try:
                text_fields = {key: value for key, value in values.items() if isinstance(value, str)}
                fields = _template_fields(template)
                prompt = template.format_map(text_fields | {"context": context, "input": question})
            except (KeyError, IndexError, ValueError) as error:
                raise DataSourceError(
                    f"prompt template for {name!r} cannot be filled ({error!r}); it may use only {{context}}, "
                    f"{{input}} and the rows' text fields: {template!r:.200}"
                ) from error
            # LongBench's templates all hold {context} (some, as lcc's, no {input}): without it, the model would
            # answer without the text the row is about.
            if "context" not in fields:
                raise DataSourceError(
                    f"prompt template for {name!r} in {origin} has no {{context}}, so every prompt would leave out "
                    f"the row's context: {template!r:.200}"
                )
        if prompt is None:
            continue
        examples.append(
            TaskExample(
                example_id=example_id,
                task=name,
                prompt=prompt,
                answers=answers,
                context=context,
                question=question,
                all_classes=all_classes,  # [] kept: a classification task refuses it showing the value given
                max_new_tokens=max_new_tokens or LONGBENCH_MAX_NEW_TOKENS.get(name.removesuffix("_e")),
                length=length,
                metadata={"source": row.location},
            )
        )
    _finish(examples, policy, path, report)
    return examples


_NATIVE_COLUMNS = list(TaskExample.model_fields)


def load_task_examples(
    path: str | Path,
    *,
    fmt: str = "auto",
    skip_bad_rows: bool = False,
    limit: int | None = None,
    report: LoadReport | None = None,
) -> list[TaskExample]:
    """Examples written by `save_task_examples` (or any rows with TaskExample's fields)."""
    policy = BadRowPolicy(skip_bad_rows)
    source = _open(path, _NATIVE_COLUMNS, fmt, policy, None)
    _check_schema(source, [["example_id", "task", "prompt", "answers"]], f"task source {str(path)!r}")
    examples: list[TaskExample] = []
    for row in _rows_until(source, examples, limit):
        fields = {key: value for key, value in row.values.items() if value is not None}  # null = default
        try:
            examples.append(TaskExample.model_validate(fields))
        except ValueError as error:
            policy.reject(row.location, f"not a task example: {error}".replace("\n", "; "))
    _finish(examples, policy, path, report)
    return examples


def save_task_examples(examples: Iterable[TaskExample], path: str | Path) -> int:
    """Write examples as JSON lines; returns how many."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(file, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.model_dump(), ensure_ascii=False) + "\n")
            count += 1
    return count
