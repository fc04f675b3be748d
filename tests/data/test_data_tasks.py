import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine.data.sources import BadRowError, DataSourceError, EmptySourceError, MissingColumnError
from refine.data.tasks import (
    DEFAULT_LONGBENCH_TEMPLATE,
    MAX_GEN_TOKENS,
    LoadReport,
    TaskExample,
    load_longbench,
    load_ruler_qa,
    load_task_examples,
    save_task_examples,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


RULER_ROWS = [
    {"index": 7, "prompt": "Doc 1: Paris is in France.\nQuestion: Where is Paris?\nAnswer:", "answer": ["France"],
     "max_gen_tokens": 3, "task": "ruler_squadqa"},
    {"index": 8, "prompt": "Doc 1: ...\nQuestion: Who?\nAnswer:", "answer": ["Frank Lowy", "Lowy"],
     "max_answer_length": 4},  # the release's gold-answer length: not a budget
]


def test_ruler_qa_jsonl_and_parquet_give_the_same_examples(tmp_path):
    from_jsonl = load_ruler_qa(write_jsonl(tmp_path / "ruler.jsonl", RULER_ROWS))
    pq.write_table(pa.Table.from_pylist(RULER_ROWS), tmp_path / "ruler.parquet")
    from_parquet = load_ruler_qa(tmp_path / "ruler.parquet")
    for examples in (from_jsonl, from_parquet):
        assert [e.example_id for e in examples] == ["7", "8"]
        assert examples[0].task == "ruler_squadqa"
        assert examples[1].task == "ruler_qa"  # no task given: the default name
        assert examples[1].answers == ["Frank Lowy", "Lowy"]
        assert [e.max_new_tokens for e in examples] == [3, None]  # None: refine eval's default budget
        assert examples[0].prompt.endswith("Answer:")
    assert load_ruler_qa(tmp_path / "ruler.jsonl", task="mine")[0].task == "mine"


def test_a_parquet_folder_reads_each_files_own_optional_columns(tmp_path):
    """A folder's files may differ in optional columns, as JSON-lines records may: one file's all_classes and
    max_gen_tokens are read though another file lacks them (they were dropped for every file)."""
    folder = tmp_path / "longbench"
    folder.mkdir()
    pq.write_table(pa.table({"input": ["q1"], "context": ["c"], "answers": [["a"]], "dataset": ["trec"],
                             "all_classes": [["a", "b"]], "max_gen_tokens": [7]}), folder / "trec.parquet")
    pq.write_table(pa.table({"input": ["q2"], "context": ["c"], "answers": [["b"]], "dataset": ["hotpotqa"]}),
                   folder / "zhotpot.parquet")
    trec, hotpot = load_longbench(folder)
    assert (trec.all_classes, trec.max_new_tokens) == (["a", "b"], 7)
    assert (hotpot.all_classes, hotpot.max_new_tokens) == (None, 32)  # LongBench's budget for hotpotqa


def test_ruler_own_output_format_appends_the_answer_prefix(tmp_path):
    rows = [
        {"index": 0, "input": "Context... Question: Q?", "outputs": ["42"], "answer_prefix": " Answer:", "length": 99}
    ]
    example = load_ruler_qa(write_jsonl(tmp_path / "qa_1.jsonl", rows))[0]
    assert example.prompt == "Context... Question: Q? Answer:" and example.answers == ["42"]
    # RULER's rows are RULER's QA task, scored with its metric: named by the file, or the folder RULER writes.
    assert example.task == "qa_1"
    (tmp_path / "qa_2").mkdir()
    assert load_ruler_qa(write_jsonl(tmp_path / "qa_2" / "validation.jsonl", rows))[0].task == "qa_2"
    assert load_ruler_qa(write_jsonl(tmp_path / "mine.jsonl", rows))[0].task == "qa"
    ours = [{"prompt": "Context... Q?\nAnswer:", "answer": ["42"]}]  # the paper's format: its first-line rule
    assert load_ruler_qa(write_jsonl(tmp_path / "paper.jsonl", ours))[0].task == "ruler_qa"


def test_longbench_rows_build_prompts_from_templates(tmp_path):
    rows = [
        {"input": "Who wrote it?", "context": "A long story by Ann.", "answers": ["Ann"], "length": 12,
         "dataset": "narrativeqa", "language": "en", "all_classes": None, "_id": "abc"},
        {"input": "What type?", "context": "Examples...", "answers": ["City"], "length": 5,
         "dataset": "trec", "language": "en", "all_classes": ["City", "Food"], "_id": "def"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    default = load_longbench(path)
    assert default[0].prompt == DEFAULT_LONGBENCH_TEMPLATE.format(context="A long story by Ann.", input="Who wrote it?")
    assert (default[0].task, default[0].example_id, default[0].length) == ("narrativeqa", "abc", 12)
    assert default[0].context == "A long story by Ann." and default[0].question == "Who wrote it?"
    assert default[1].all_classes == ["City", "Food"] and default[0].all_classes is None

    templates = {"narrativeqa": "Story: {context}\nQ: {input}\nA:", "trec": "{context}\n{input}"}
    (tmp_path / "dataset2prompt.json").write_text(json.dumps(templates))
    for source in (templates, tmp_path / "dataset2prompt.json"):
        examples = load_longbench(path, prompt_templates=source)
        assert examples[0].prompt == "Story: A long story by Ann.\nQ: Who wrote it?\nA:"
        assert examples[1].prompt == "Examples...\nWhat type?"
    with pytest.raises(DataSourceError, match="template for 'narrativeqa' cannot be filled"):
        load_longbench(path, prompt_template="{context} {missing_field}")
    # Attribute or index access would put a method's repr or one character into the prompt.
    for template in ("{context.upper} {input}", "{context[0]} {input}", "{} {input}"):
        with pytest.raises(DataSourceError, match="is not a plain field name"):
            load_longbench(path, prompt_template=template)


def test_longbench_dataset_name_from_file_name_and_preprocessed_prompts(tmp_path):
    rows = [{"input": "q", "context": "c", "answers": ["a"], "all_classes": None}]
    assert load_longbench(write_jsonl(tmp_path / "hotpotqa.jsonl", rows))[0].task == "hotpotqa"
    assert load_longbench(tmp_path / "hotpotqa.jsonl", dataset="2wikimqa")[0].task == "2wikimqa"
    ready = [{"prompt": "Full prompt\nAnswer:", "answers": ["x"], "task": "musique", "max_gen_tokens": 5}]
    pq.write_table(pa.Table.from_pylist(ready), tmp_path / "musique.parquet")
    example = load_longbench(tmp_path / "musique.parquet")[0]
    assert (example.prompt, example.task, example.max_new_tokens) == ("Full prompt\nAnswer:", "musique", 5)


def test_longbench_answer_budgets_are_the_benchmarks_unless_a_row_gives_one(tmp_path):
    rows = [{"input": "q", "context": "c", "answers": ["a"], "dataset": name}
            for name in ("gov_report", "qasper_e", "hotpotqa", "my_own_task")]
    rows.append({"input": "q", "context": "c", "answers": ["a"], "dataset": "gov_report", "max_gen_tokens": 7})
    # The release's max_answer_length is the gold answer's length: generating up to it would leak the answer.
    rows.append({"input": "q", "context": "c", "answers": ["a"], "dataset": "hotpotqa", "max_answer_length": 2})
    budgets = [example.max_new_tokens for example in load_longbench(write_jsonl(tmp_path / "lb.jsonl", rows))]
    assert budgets == [512, 128, 32, None, 7, 32]  # None: refine eval's default budget


def test_task_loaders_bad_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(EmptySourceError):
        load_ruler_qa(tmp_path / "empty.jsonl")
    (tmp_path / "notes.txt").write_text("free text")
    with pytest.raises(DataSourceError, match="task data must be JSON lines, parquet or save_to_disk, not text"):
        load_longbench(tmp_path / "notes.txt")
    pq.write_table(pa.table({"question": ["q"], "answer": [["a"]]}), tmp_path / "wrong.parquet")
    with pytest.raises(MissingColumnError, match=r"column 'prompt' not found .*\['question', 'answer'\]"):
        load_ruler_qa(tmp_path / "wrong.parquet")
    with pytest.raises(MissingColumnError, match="column 'input' not found"):
        load_longbench(tmp_path / "wrong.parquet")

    path = tmp_path / "ruler.jsonl"
    path.write_bytes(
        json.dumps(RULER_ROWS[0]).encode() + b"\n"
        + b'{"prompt": "p", "answer": ["a"\n'  # malformed
        + b'{"prompt": "p", "answer": 5}\n'  # wrong answer type
        + b'{"prompt": "\xff", "answer": ["a"]}\n'  # undecodable
        + json.dumps(RULER_ROWS[1]).encode() + b"\n"
    )
    with pytest.raises(BadRowError, match=r"ruler.jsonl, line 2: malformed JSON"):
        load_ruler_qa(path)
    report = LoadReport()
    examples = load_ruler_qa(path, skip_bad_rows=True, report=report)
    assert [e.example_id for e in examples] == ["7", "8"]
    assert (report.examples, report.bad_rows) == (2, 3)

    bad_answers = write_jsonl(tmp_path / "lb.jsonl", [{"input": "q", "context": "c", "answers": []}])
    with pytest.raises(BadRowError, match=r"line 1: field 'answers' must be a non-empty list of strings"):
        load_longbench(bad_answers)
    with pytest.raises(DataSourceError, match="no task example could be read .*1 bad rows"):
        load_longbench(bad_answers, skip_bad_rows=True)


def test_native_examples_round_trip(tmp_path):
    examples = [
        TaskExample(example_id="a", task="niah_single", prompt="p1", answers=["1"], metadata={"depth": 0.5}),
        TaskExample(example_id="b", task="trec", prompt="p2", answers=["City"], all_classes=["City", "Food"]),
    ]
    assert save_task_examples(examples, tmp_path / "out" / "tasks.jsonl") == 2
    assert load_task_examples(tmp_path / "out" / "tasks.jsonl") == examples
    (tmp_path / "broken.jsonl").write_text('{"example_id": "x", "task": "t", "prompt": "p", "answers": "not a list"}\n')
    with pytest.raises(BadRowError, match="line 1: not a task example"):
        load_task_examples(tmp_path / "broken.jsonl")


GOOD_RULER = {"prompt": "Doc: Oslo is the capital.\nQ: capital?\nA:", "answer": ["Oslo"]}
GOOD_LONGBENCH = {"input": "q?", "context": "ctx text", "answers": ["x"], "dataset": "hotpotqa"}


@pytest.mark.parametrize(
    ("loader", "row", "message"),
    [
        (load_ruler_qa, GOOD_RULER | {"answer": [""]}, "field 'answer' holds an empty or whitespace gold answer"),
        (load_ruler_qa, GOOD_RULER | {"answer": " "}, "field 'answer' holds an empty or whitespace gold answer"),
        (load_ruler_qa, GOOD_RULER | {"answer": ["Oslo", "\n"]}, "field 'answer' holds an empty or whitespace"),
        (load_ruler_qa, {"input": "Q?", "outputs": [""]}, "field 'outputs' holds an empty or whitespace"),
        (load_ruler_qa, GOOD_RULER | {"prompt": ""}, "field 'prompt' is empty or whitespace"),
        (load_ruler_qa, {"input": "  ", "outputs": ["a"]}, "field 'input' is empty or whitespace"),
        (load_longbench, GOOD_LONGBENCH | {"answers": [""]}, "field 'answers' holds an empty or whitespace"),
        (load_longbench, GOOD_LONGBENCH | {"context": ""}, "field 'context' is empty or whitespace"),
        (load_longbench, {"prompt": " \n", "answers": ["x"], "task": "musique"}, "field 'prompt' is empty or"),
        # A dataset field that is there but names none is refused, not passed over for the file's name.
        (load_longbench, GOOD_LONGBENCH | {"dataset": ""}, "field 'dataset' must name the LongBench dataset "
                                                           r"\(e.g. 'hotpotqa'\), got ''"),
        (load_longbench, GOOD_LONGBENCH | {"dataset": 5}, "field 'dataset' must name the LongBench dataset .*got 5"),
    ],
    ids=["empty-answer", "blank-answer", "one-blank-answer", "ruler-outputs", "empty-prompt", "blank-input",
         "longbench-answer", "longbench-context", "longbench-prompt", "longbench-empty-dataset",
         "longbench-numeric-dataset"],
)
def test_empty_gold_answers_prompts_and_contexts_are_bad_rows(tmp_path, loader, row, message):
    good = GOOD_RULER if loader is load_ruler_qa else GOOD_LONGBENCH
    path = write_jsonl(tmp_path / "rows.jsonl", [good, row])
    with pytest.raises(BadRowError, match=rf"rows.jsonl, line 2: {message}"):
        loader(path)
    report = LoadReport()
    assert len(loader(path, skip_bad_rows=True, report=report)) == 1 and report.bad_rows == 1


def test_integral_floats_are_the_integers_a_dataframe_export_writes(tmp_path):
    rows = [GOOD_LONGBENCH | {"length": 12.0, "max_gen_tokens": 5.0}, GOOD_LONGBENCH | {"length": 12.5}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(BadRowError, match=r"line 2: field 'length' must be an integer >= 0 or null, got 12.5"):
        load_longbench(path)
    [example] = load_longbench(path, skip_bad_rows=True)
    assert example.max_new_tokens == 5 and type(example.max_new_tokens) is int


@pytest.mark.parametrize("field", ["length", "max_gen_tokens"])
def test_a_boolean_where_a_row_takes_a_whole_number_is_a_bad_row(tmp_path, field):
    """JSON true is a Python int (True == 1): it is refused, not read as a length or an answer budget of 1."""
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_LONGBENCH, GOOD_LONGBENCH | {field: True}])
    with pytest.raises(BadRowError, match=rf"line 2: field '{field}' must be an integer .* got True"):
        load_longbench(path)
    assert len(load_longbench(path, skip_bad_rows=True)) == 1


def test_longbench_keeps_rows_without_a_question(tmp_path):
    """Summarization and code datasets (gov_report, lcc, ...) have an empty "input"."""
    rows = [{"input": "", "context": "A long report.", "answers": ["A summary."], "dataset": "gov_report"}]
    example = load_longbench(write_jsonl(tmp_path / "gov_report.jsonl", rows))[0]
    assert example.question == "" and example.context == "A long report." and example.answers == ["A summary."]


def test_task_examples_need_text_in_every_gold_answer(tmp_path):
    with pytest.raises(ValueError, match=r"gold answer 1 is empty or whitespace \(' '\)"):
        TaskExample(example_id="a", task="niah_single", prompt="p", answers=["1", " "])
    row = {"example_id": "x", "task": "t", "prompt": "p", "answers": [""]}
    with pytest.raises(BadRowError, match="line 1: not a task example.*gold answer 0 is empty"):
        load_task_examples(write_jsonl(tmp_path / "native.jsonl", [row]))


def test_a_zero_answer_budget_is_a_bad_row(tmp_path):
    rows = [{"prompt": "P?", "answer": ["a"], "max_gen_tokens": 0}]
    with pytest.raises(DataSourceError, match=r"line 1: field 'max_gen_tokens' must be an integer in \[1, 65536\] or "
                                              r"null, got 0"):
        load_ruler_qa(write_jsonl(tmp_path / "qa.jsonl", rows))


@pytest.mark.parametrize(("loader", "good"), [(load_ruler_qa, GOOD_RULER), (load_longbench, GOOD_LONGBENCH)],
                         ids=["ruler-qa", "longbench"])
def test_an_answer_budget_past_the_limit_is_a_bad_row(tmp_path, loader, good):
    """10**12 was taken as the answer's budget: its greedy decode ran until the model happened to emit EOS."""
    rows = [good | {"max_gen_tokens": MAX_GEN_TOKENS}, good | {"max_gen_tokens": 10**12}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(BadRowError, match=rf"rows.jsonl, line 2: field 'max_gen_tokens' must be an integer in "
                                          rf"\[1, {MAX_GEN_TOKENS}\] or null, got 1000000000000"):
        loader(path)
    report = LoadReport()
    assert [e.max_new_tokens for e in loader(path, skip_bad_rows=True, report=report)] == [MAX_GEN_TOKENS]
    assert report.bad_rows == 1


def test_a_native_example_past_the_answer_budget_limit_is_a_bad_row(tmp_path):
    row = {"example_id": "x", "task": "t", "prompt": "p", "answers": ["a"], "max_new_tokens": MAX_GEN_TOKENS + 1}
    with pytest.raises(BadRowError, match=rf"line 1: not a task example.*max_new_tokens.*{MAX_GEN_TOKENS}"):
        load_task_examples(write_jsonl(tmp_path / "native.jsonl", [row]))


@pytest.mark.parametrize(
    ("loader", "row", "field"),
    [
        (load_ruler_qa, GOOD_RULER | {"answer": ["Oslo", "\ud800"]}, "answer"),
        (load_ruler_qa, GOOD_RULER | {"answer": "Os\ud800lo"}, "answer"),
        (load_ruler_qa, {"input": "Q?", "outputs": ["\udfff"]}, "outputs"),
        (load_ruler_qa, GOOD_RULER | {"index": "id-\ud800"}, "index"),
        (load_longbench, GOOD_LONGBENCH | {"answers": ["\ud800"]}, "answers"),
        (load_longbench, GOOD_LONGBENCH | {"_id": "\ud800"}, "_id"),
    ],
    ids=["ruler-answer", "ruler-answer-string", "ruler-outputs", "ruler-index", "longbench-answers", "longbench-id"],
)
def test_lone_surrogates_in_gold_answers_and_ids_are_bad_rows(tmp_path, loader, row, field):
    """They were taken: `refine eval` answered every prompt, then failed writing the results ('utf-8' codec can't
    encode) after truncating the earlier results file."""
    good = GOOD_RULER if loader is load_ruler_qa else GOOD_LONGBENCH
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")  # ASCII JSON: "\ud800" escapes
    with pytest.raises(BadRowError, match=rf"rows.jsonl, line 2: column '{field}' holds a lone surrogate"):
        loader(path)
    report = LoadReport()
    assert len(loader(path, skip_bad_rows=True, report=report)) == 1 and report.bad_rows == 1


@pytest.mark.parametrize("field", ["answer_prefix", "task"])
def test_ruler_text_fields_of_another_type_are_bad_rows(tmp_path, field):
    """answer_prefix: 5 was dropped from the prompt and task: 5 replaced by the default name, silently."""
    good = {"input": "Doc: Oslo.\nQ: capital?", "outputs": ["Oslo"], "answer_prefix": " Answer:", "task": "qa_1"}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, good | {field: 5}])
    with pytest.raises(BadRowError, match=rf"rows.jsonl, line 2: column '{field}' must hold text, got int: 5"):
        load_ruler_qa(path)
    report = LoadReport()
    examples = load_ruler_qa(path, skip_bad_rows=True, report=report)
    assert len(examples) == 1 and report.bad_rows == 1
    assert examples[0].prompt.endswith("Q: capital? Answer:") and examples[0].task == "qa_1"
    # null, or no field, is still no prefix / the default task
    loose = load_ruler_qa(write_jsonl(tmp_path / "qa.jsonl", [good | {"answer_prefix": None, "task": None}]))[0]
    assert loose.prompt == good["input"] and loose.task == "qa"


def test_a_longbench_template_without_its_context_is_refused_naming_dataset_and_file(tmp_path):
    """'Answer: {input}' was taken and every prompt lost its context (16 tokens instead of 378)."""
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_LONGBENCH])
    templates = tmp_path / "dataset2prompt.json"
    templates.write_text(json.dumps({"hotpotqa": "Answer: {input}\nA:"}))
    with pytest.raises(DataSourceError, match=rf"prompt template for 'hotpotqa' in {str(templates)!r} has no "
                                              r"\{context\}"):
        load_longbench(path, prompt_templates=templates)
    with pytest.raises(DataSourceError, match=r"'hotpotqa' in prompt_template has no \{context\}"):
        load_longbench(path, prompt_template="{{context}} {input}")  # an escaped brace is text, not the field
    # lcc's and passage_count's templates have no {input}: a template needs only {context}.
    templates.write_text(json.dumps({"hotpotqa": "Code:\n{context}Next line:"}))
    assert load_longbench(path, prompt_templates=templates)[0].prompt == "Code:\nctx textNext line:"


def test_an_empty_class_list_is_kept_as_given(tmp_path):
    """all_classes: [] became None, so a classification task refused it as 'got None'."""
    row = GOOD_LONGBENCH | {"dataset": "trec", "all_classes": []}
    assert load_longbench(write_jsonl(tmp_path / "trec.jsonl", [row]))[0].all_classes == []
