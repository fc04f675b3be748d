import json
import os
import stat
import threading

import pytest

from refine.evaluation.score import PredictionRowError, main, score_predictions, write_scores


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_score_predictions_summary_and_per_example_scores():
    rows = [
        {"prediction": "Miller", "answers": ["Gates v. Collier", "Miller v. California"]},  # 0.5
        {"pred": "Paris", "answers": ["paris"]},  # LongBench's field name: 1.0
        {"prediction": "", "answers": ["x"]},  # empty: 0
    ]
    summary, scores = score_predictions("hotpotqa", rows)
    assert scores == pytest.approx([0.5, 1.0, 0.0])
    assert summary["score"] == 50.0 and summary["num_examples"] == 3 and summary["empty_predictions"] == 1
    assert summary["metric"] == "qa_f1_score" and "score_by_length" not in summary


def test_ruler_and_niah_field_names_and_length_buckets():
    rows = [
        {"pred": "Frank Lowy\nmore", "answer": ["frank lowy"], "length": 3000},
        {"pred": "nobody", "answer": ["Frank Lowy"], "length": 9000},
    ]
    summary, scores = score_predictions("ruler_qa", rows)
    assert scores == [1.0, 0.0] and summary["score"] == 50.0
    # A RULER row's length counts tokens, and RULER reports each length apart: LongBench-E's word-count buckets
    # are LongBench's alone.
    assert "score_by_length" not in summary and "rows_without_length" not in summary
    summary, _ = score_predictions("hotpotqa", [{"pred": "Lowy", "answers": ["lowy"], "length": 3000},
                                                {"pred": "nobody", "answers": ["lowy"], "length": 9000}])
    assert summary["score_by_length"] == {"0-4k": 100.0, "4-8k": None, "8k+": 0.0}
    summary, scores = score_predictions("niah_multivalue", [{"pred": "1 and 3", "outputs": ["1", "2", "3", "4"]}])
    assert scores == [0.5] and summary["score"] == 50.0


def test_mqar_takes_the_values_in_order_and_whole():
    """MQAR's prompt asks for the queried values in order: a value inside a longer number, or in another place,
    is not recalled (a substring test scored both rows 100)."""
    answers = ["482", "193", "557", "610"]
    summary, scores = score_predictions("mqar", [{"pred": " 4821 9193 1557 6104", "answers": answers},
                                                 {"pred": "610 557 193 482", "answers": answers},
                                                 {"pred": " 482 193 999 610 and more", "answers": answers}])
    assert scores == [0.0, 0.0, 0.75] and summary["metric"] == "ordered_recall" and summary["score"] == 25.0


def test_classification_needs_all_classes():
    rows = [{"prediction": "City", "answers": ["City"]}]
    with pytest.raises(PredictionRowError, match="row 0: task 'trec' is a classification task and needs 'all_classes'"):
        score_predictions("trec", rows)
    summary, scores = score_predictions("trec", rows, all_classes=["City", "Food"])
    assert scores == [1.0]
    summary, scores = score_predictions("trec", [{**rows[0], "all_classes": ["City", "Cit"]}])
    assert scores == [1.0]  # "Cit" is inside the gold "City": dropped


def test_bad_rows_name_row_and_field():
    with pytest.raises(PredictionRowError, match=r"row 1: none of the fields \['answers', 'outputs', 'answer'\]"):
        score_predictions("hotpotqa", [{"pred": "a", "answers": ["a"]}, {"pred": "a"}])
    with pytest.raises(PredictionRowError, match="row 0: field 'answers' must be a list of strings"):
        score_predictions("hotpotqa", [{"pred": "a", "answers": [1]}])
    with pytest.raises(PredictionRowError, match="row 0: field 'pred' must be a string"):
        score_predictions("hotpotqa", [{"pred": 3, "answers": ["a"]}])
    with pytest.raises(ValueError, match="no predictions"):
        score_predictions("hotpotqa", [])
    with pytest.raises(ValueError, match="unknown task"):
        score_predictions("unknown", [{"pred": "a", "answers": ["a"]}])


def test_alternative_fields_that_differ_are_refused_and_equal_ones_scored():
    """A row with both `prediction` and `pred` that differ was scored on `prediction` silently. Gold fields stay
    alternatives in order: a release row's `answers` (the accepted answers) beside its `answer` is scored on
    `answers`."""
    with pytest.raises(PredictionRowError, match=r"^row 1: fields 'prediction' and 'pred' are alternatives but differ "
                                                 r"\('Oslo' and 'Bergen'\): keep one$"):
        score_predictions("hotpotqa", [{"pred": "a", "answers": ["a"]},
                                       {"prediction": "Oslo", "pred": "Bergen", "answers": ["Oslo"]}])
    _, scores = score_predictions("hotpotqa", [{"prediction": "Oslo", "pred": "Oslo", "answers": ["Oslo"]},
                                               {"pred": "Bergen", "answers": ["Oslo", "Bergen"], "answer": "Oslo"}])
    assert scores == [1.0, 1.0]


def test_eval_cli_task_names_score_as_eval_does():
    """`refine eval --task ruler-qa` writes predictions that `refine score --task ruler-qa` must take."""
    rows = [{"pred": "Oslo\nmore text", "answers": ["Oslo"]}, {"pred": "Bergen", "answers": ["Oslo"]}]
    summary, scores = score_predictions("ruler-qa", rows)
    assert (summary["task"], summary["metric"], scores) == ("ruler_qa", "string_match_part (first line)", [1.0, 0.0])
    with pytest.raises(ValueError, match="task 'longbench' names the suite.*'hotpotqa'"):
        score_predictions("longbench", rows)


@pytest.mark.parametrize("answers", [[""], " ", ["Oslo", "  "]])
def test_empty_gold_answers_are_refused(answers):
    """An empty gold answer is inside every prediction: it would score anything as right."""
    rows = [{"pred": "a", "answers": ["a"]}, {"pred": "garbage", "answers": answers}]
    with pytest.raises(PredictionRowError, match="row 1: field 'answers' holds an empty or whitespace gold answer"):
        score_predictions("niah", rows)


def test_retrieval_gold_without_a_paragraph_number_names_the_row():
    rows = [{"pred": "Paragraph 3", "answers": ["Paragraph 3"]}, {"pred": "3", "answers": ["3"]}]
    with pytest.raises(PredictionRowError, match="row 1: task 'passage_retrieval_en' needs every gold answer to "
                                                 "contain 'Paragraph <n>', got '3'"):
        score_predictions("passage_retrieval_en", rows)
    with pytest.raises(PredictionRowError, match=r"^q2\.jsonl, line 5: task"):
        score_predictions("passage_retrieval_en", rows, row_names=["q2.jsonl, line 2", "q2.jsonl, line 5"])


@pytest.mark.parametrize(
    ("task", "bad_row", "message"),
    [
        ("trec", {"pred": "City", "answers": ["City"]}, "task 'trec' is a classification task and needs 'all_classes'"),
        ("passage_retrieval_en", {"pred": "3", "answers": ["3"]}, "task 'passage_retrieval_en' needs every gold"),
        ("hotpotqa", {"pred": "a", "answers": [""]}, "field 'answers' holds an empty or whitespace gold answer"),
        ("hotpotqa", {"pred": "a"}, "none of the fields"),
    ],
)
def test_command_line_errors_name_the_file_line(task, bad_row, message, tmp_path, capsys):
    good = {"pred": "Paragraph 1", "answers": ["Paragraph 1"], "all_classes": ["City", "Paragraph 1"]}
    path = tmp_path / "preds.jsonl"
    # Blank lines before the bad row: it is row 1 of the rows but line 4 of the file.
    path.write_text(json.dumps(good) + "\n\n\n" + json.dumps(bad_row) + "\n")
    assert main(["--task", task, "--predictions", str(path)]) == 2
    assert f"preds.jsonl, line 4: {message}" in capsys.readouterr().err


def test_command_line_prints_summary_and_writes_per_example_scores(tmp_path, capsys):
    predictions = write_jsonl(
        tmp_path / "preds.jsonl",
        [
            {"_id": "q1", "pred": "the cat sat on the mat", "answers": ["the cat is on the mat"]},
            {"_id": "q2", "pred": "", "answers": ["anything"]},
        ],
    )
    output = tmp_path / "out" / "scores.jsonl"
    assert main(["--task", "gov_report", "--predictions", str(predictions), "--output", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "gov_report" and summary["score"] == 40.0  # (0.8 + 0) / 2
    per_example = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["_id"] for row in per_example] == ["q1", "q2"]
    # On the summary's scale, as refine eval's per-example scores (they were 0.8 here: 100 times apart).
    assert per_example[0]["score"] == pytest.approx(80.0, abs=1e-5) and per_example[1]["score"] == 0.0


def test_command_line_reports_bad_input(tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"pred": "a", "answers": ["a"]}\n{"pred": \n')
    assert main(["--task", "hotpotqa", "--predictions", str(broken)]) == 2
    assert "broken.jsonl, line 2: malformed JSON" in capsys.readouterr().err
    assert main(["--task", "hotpotqa", "--predictions", str(tmp_path / "missing.jsonl")]) == 2
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["City", "Food"]))
    rows = write_jsonl(tmp_path / "trec.jsonl", [{"pred": "Food", "answers": ["Food"]}])
    assert main(["--task", "trec", "--predictions", str(rows), "--all-classes", str(classes)]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 100.0


def test_command_line_reads_what_python_cannot_hold_as_a_bad_line(tmp_path, capsys):
    good = json.dumps({"pred": "cat", "answers": ["cat"]})
    for name, line in (("deep", "[" * 100_000), ("huge", '{"pred": ' + "9" * 5000 + "}")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(good + "\n" + line + "\n")
        assert main(["--task", "hotpotqa", "--predictions", str(path)]) == 2
        assert f"{name}.jsonl, line 2: unreadable JSON" in capsys.readouterr().err
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n")  # as editors on Windows save it
    assert main(["--task", "hotpotqa", "--predictions", str(bom)]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 100.0


def test_command_line_names_a_bad_class_file_and_a_bad_output_before_scoring(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "trec.jsonl", [{"pred": "Food", "answers": ["Food"]}])
    classes = tmp_path / "classes.json"
    classes.write_text("[\"City\", ")
    assert main(["--task", "trec", "--predictions", str(rows), "--all-classes", str(classes)]) == 2
    assert f"--all-classes file {str(classes)!r}: unreadable JSON" in capsys.readouterr().err
    (tmp_path / "a_dir").mkdir()
    assert main(["--task", "trec", "--predictions", str(rows), "--all-classes", str(classes),
                 "--output", str(tmp_path / "a_dir")]) == 2
    captured = capsys.readouterr()  # the output is checked first: no scoring, no summary
    assert "--output" in captured.err and "is a directory" in captured.err and captured.out == ""
    classes.write_text('["City", "Food"]')
    for output, flag in ((rows, "--predictions"), (classes, "--all-classes")):
        before = output.read_bytes()
        assert main(["--task", "trec", "--predictions", str(rows), "--all-classes", str(classes),
                     "--output", str(output)]) == 2
        captured = capsys.readouterr()
        assert f"--output {str(output)!r} is {flag} {str(output)!r}: writing the results would replace it" \
            in captured.err and captured.out == ""
        assert output.read_bytes() == before


def test_per_example_rows_name_their_file_line(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    path.write_text("\n" + json.dumps({"pred": "cat", "answers": ["cat"]}) + "\n\n" + json.dumps({"pred": "dog", "answers": ["cat"]}) + "\n")
    output = tmp_path / "scores.jsonl"
    assert main(["--task", "hotpotqa", "--predictions", str(path), "--output", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(row["row"], row["line"], row["score"]) for row in rows] == [(0, 2, 100.0), (1, 4, 0.0)]


def test_row_values_are_reported_as_given():
    with pytest.raises(PredictionRowError, match=r"row 0: .*got \[\]"):
        score_predictions("trec", [{"pred": "City", "answers": ["City"], "all_classes": []}], all_classes=["City"])
    for bad in (-5, "3500", 35.5, True):
        with pytest.raises(PredictionRowError, match=f"row 1: field 'length' must be an integer >= 0, got {bad!r}"):
            score_predictions("hotpotqa", [{"pred": "a", "answers": ["a"], "length": 3},
                                           {"pred": "a", "answers": ["a"], "length": bad}])


def test_length_buckets_take_integral_floats_and_say_when_rows_lack_a_length():
    rows = [{"pred": "Oslo", "answers": ["Oslo"], "length": 3500.0},
            {"pred": "Rome", "answers": ["Oslo"], "length": 9000}]
    summary, _ = score_predictions("hotpotqa", rows)
    assert summary["score_by_length"] == {"0-4k": 100.0, "4-8k": None, "8k+": 0.0}
    summary, _ = score_predictions("hotpotqa", [*rows, {"pred": "Oslo", "answers": ["Oslo"], "length": None}])
    assert "score_by_length" not in summary and summary["rows_without_length"] == 1


def test_a_row_without_classes_takes_the_fallback_classes():
    """A null all_classes is "none given": the --all-classes list applies, as to a row without the field."""
    row = {"pred": "Type: City", "answers": ["City"], "all_classes": None}
    summary, _ = score_predictions("trec", [row], all_classes=["City", "Town"])
    assert summary["score"] == 100.0


def test_refine_score_passes_its_options_through_the_refine_command(tmp_path, capsys):
    """`refine score --task ... --predictions ...`, as the README writes it, reaches the scorer."""
    from refine.cli import main as refine_main

    rows = write_jsonl(tmp_path / "preds.jsonl", [{"pred": "Paris", "answers": ["Paris"]},
                                                  {"pred": "Rome", "answers": ["Oslo"]}])
    assert refine_main(["score", "--task", "hotpotqa", "--predictions", str(rows)]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 50.0
    with pytest.raises(SystemExit) as exit_info:
        refine_main(["score", "-h"])
    assert exit_info.value.code == 0 and "--predictions" in capsys.readouterr().out


def test_command_line_scores_with_the_release_rules_on_request(tmp_path, capsys):
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({"prediction": "Oslo\nthen a long tail of words", "answers": ["Oslo"]}) + "\n")
    assert main(["--task", "hotpotqa", "--predictions", str(predictions)]) == 0
    longbench = json.loads(capsys.readouterr().out)
    assert main(["--task", "hotpotqa", "--predictions", str(predictions), "--longbench-scoring", "refine-release"]) == 0
    release = json.loads(capsys.readouterr().out)
    assert release["score"] == 100.0 and longbench["score"] < 100.0
    assert release["metric"] == "qa_f1_score (REFINE release)"


@pytest.mark.parametrize("field", ["_id", "id", "index"])
def test_an_id_the_per_example_scores_cannot_hold_is_refused_and_the_earlier_file_kept(tmp_path, capsys, field):
    """_id: "\\ud800" failed writing --output ('utf-8' codec can't encode) after truncating it."""
    predictions = tmp_path / "preds.jsonl"
    good = json.dumps({"pred": "cat", "answers": ["cat"], field: "q1"})
    predictions.write_text(good + "\n\n" + json.dumps({"pred": "cat", "answers": ["cat"], field: ["x\ud800"]}) + "\n")
    output = tmp_path / "scores.jsonl"
    output.write_text("earlier scores\n")
    assert main(["--task", "hotpotqa", "--predictions", str(predictions), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refine score: error: {predictions}, line 3: field {field!r} holds a lone surrogate "
                          f"'\\ud800'")
    assert output.read_text() == "earlier scores\n"
    assert main(["--task", "hotpotqa", "--predictions", str(predictions)]) == 0  # no --output: the id is not written
    capsys.readouterr()
    predictions.write_text(good + "\n" + json.dumps({"pred": "cat", "answers": ["cat"], field: float("nan")}) + "\n")
    assert main(["--task", "hotpotqa", "--predictions", str(predictions), "--output", str(output)]) == 2
    assert capsys.readouterr().err.startswith(f"refine score: error: {predictions}, line 2: field {field!r} holds NaN "
                                              f"or Infinity, which JSON has not: nan")
    assert output.read_text() == "earlier scores\n"


def test_per_example_scores_are_written_whole_or_not_at_all(tmp_path):
    output = tmp_path / "scores.jsonl"
    output.write_text("earlier scores\n")
    numbered = [({"_id": "q1"}, 1), ({"_id": "\ud800"}, 2)]
    with pytest.raises(UnicodeEncodeError):
        write_scores(output, numbered, [1.0, 0.0])
    assert output.read_text() == "earlier scores\n"


def test_an_output_that_is_a_link_or_a_fifo_is_written_into_not_replaced(tmp_path, capsys):
    """--output replaced whatever it named with a regular file: a link to shared/scores.jsonl became a file of its
    own (the shared file kept its old scores), and a FIFO (or, as root, a device such as /dev/full) was replaced."""
    predictions = write_jsonl(tmp_path / "preds.jsonl", [{"_id": "q1", "pred": "a b", "answers": ["a b"]}])
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "scores.jsonl").write_text("old\n")
    link = tmp_path / "mine.jsonl"
    link.symlink_to(tmp_path / "shared" / "scores.jsonl")
    assert main(["--task", "hotpotqa", "--predictions", str(predictions), "--output", str(link)]) == 0
    assert link.is_symlink() and json.loads((tmp_path / "shared" / "scores.jsonl").read_text())["_id"] == "q1"
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    assert main(["--task", "hotpotqa", "--predictions", str(predictions), "--output", str(fifo)]) == 0
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and json.loads(received[0])["_id"] == "q1"


def test_an_output_ending_in_a_slash_is_refused_before_scoring(tmp_path, capsys):
    """`--output newout/` wrote the scores to a file named newout."""
    predictions = write_jsonl(tmp_path / "preds.jsonl", [{"_id": "q1", "pred": "a b", "answers": ["a b"]}])
    assert main(["--task", "hotpotqa", "--predictions", str(predictions), "--output", f"{tmp_path / 'newout'}/"]) == 2
    assert capsys.readouterr().err == (f"refine score: error: --output '{tmp_path / 'newout'}/' ends in '/', which "
                                       f"names a folder: give a file path\n")
    assert not (tmp_path / "newout").exists()


def test_flags_the_tasks_metric_does_not_read_are_named_and_the_scores_kept(tmp_path, capsys):
    """--all-classes for a QA task, --code-sim-backend for a task that is not code, --longbench-scoring for RULER were
    taken without a word."""
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"pred": "Oslo", "answers": ["Oslo"]}) + "\n")
    classes = tmp_path / "classes.json"
    classes.write_text('["a", "b"]')
    assert main(["--task", "qasper", "--predictions", str(predictions), "--all-classes", str(classes),
                 "--code-sim-backend", "levenshtein"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["score"] == 100.0
    assert captured.err.splitlines() == [
        "refine score: --all-classes unused: qasper's metric (qa_f1_score) takes no class list",
        "refine score: --code-sim-backend unused: qasper's metric (qa_f1_score) is not code similarity"]
    assert main(["--task", "ruler_qa", "--predictions", str(predictions), "--longbench-scoring", "refine-release"]) == 0
    assert capsys.readouterr().err == "refine score: --longbench-scoring unused: ruler_qa is not a LongBench dataset\n"
    assert main(["--task", "lcc", "--predictions", str(predictions), "--code-sim-backend", "levenshtein"]) == 0
    assert "unused" not in capsys.readouterr().err
