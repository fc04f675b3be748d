"""Every metric against values worked out by hand from the benchmarks' definitions."""

import pytest

from refine.evaluation.metrics import (
    aggregate,
    aggregate_by_length,
    longbench_task_name,
    classification_score,
    code_sim_score,
    count_score,
    f1_score,
    fuzz_ratio,
    longbench_score,
    niah_score,
    normalize_answer,
    normalize_zh_answer,
    ordered_recall_score,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    ruler_official_qa_score,
    ruler_postprocess,
    ruler_aggregate,
    ruler_qa_score,
    string_match_all,
    string_match_part,
    task_metric,
)

approx = pytest.approx


def characters(text):
    return list(text)


# ---------------------------------------------------------------- normalization and F1


def test_normalize_answer_lowercases_strips_punctuation_articles_and_spaces():
    assert normalize_answer("The  Cat, sat!  on a MAT.") == "cat sat on mat"
    assert normalize_answer("An apple-pie; the end") == "applepie end"  # '-' is punctuation: removed, not a space
    assert normalize_answer("Theatre and anthem") == "theatre and anthem"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_normalize_zh_answer_removes_chinese_punctuation_and_all_spaces():
    assert normalize_zh_answer("北京， 是 中国的首都。ABC!") == "北京是中国的首都abc"
    assert normalize_zh_answer("《书名》") == "《书名"  # LongBench's set has the closing mark only


def test_qa_f1_hand_computed():
    # tokens: [cat, sat] vs [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3
    assert qa_f1_score("The cat sat", "cat sat on the mat") == approx(2 / 3)
    assert qa_f1_score("Paris.", "paris") == 1.0  # punctuation and case ignored
    assert qa_f1_score("the", "a") == 0.0  # both normalize to nothing
    assert qa_f1_score("", "Paris") == 0.0  # empty prediction
    # multiset overlap: [x, y, y] vs [y, y, z]: 2 common, P = R = 2/3
    assert qa_f1_score("x y y", "y y z") == approx(2 / 3)
    assert f1_score(["a", "a", "b"], ["a"]) == approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_qa_f1_zh_with_a_given_segmenter_and_with_jieba():
    # characters after normalization: [北, 京] vs [北, 京, 天, 安, 门]: P = 1, R = 2/5, F1 = 4/7
    assert qa_f1_zh_score("北京。", "北京天安门", segment=characters) == approx(4 / 7)
    assert qa_f1_zh_score("", "北京", segment=characters) == 0.0
    pytest.importorskip("jieba", reason="LongBench's Chinese metrics segment with jieba")
    # jieba: [我们, 去, 北京] vs [北京]: P = 1/3, R = 1, F1 = 1/2
    assert qa_f1_zh_score("我们去北京", "北京") == approx(0.5)


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_uses_word_sets_like_the_rouge_package():
    # ref words {the, cat, is, on, mat} (m = 5), prediction {the, cat, sat, on, mat} (n = 5);
    # LCS "the cat on the mat" -> word set {the, cat, on, mat} = 4: R = P = 4/5, F = 0.8 (less 1e-8 smoothing)
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == approx(0.8, abs=1e-7)


def test_rouge_l_union_over_sentences():
    # prediction sentences [a b], [c d]; reference [a c], [d]
    # union LCS words: (a c | a b) -> {a}, (a c | c d) -> {c}, (d | c d) -> {d}: 3 words
    # m = |{a, c, d}| = 3, n = |{a, b, c, d}| = 4: R = 1, P = 3/4, F = 2 * 0.75 / 1.75
    assert rouge_score("a b. c d", "a c. d") == approx(2 * 0.75 / 1.75, abs=1e-7)


def test_rouge_l_breaks_lcs_ties_as_the_rouge_package() -> None:
    """Without this, a changed back-tracking tie-break goes unnoticed: with two LCSs of equal length the
    traced word decides the union, and the score moves away from the rouge package's."""
    # Reference [a b] against prediction sentence [b a]: two LCSs of length 1, {a} and {b}. The rouge
    # package's _recon_lcs steps back along the prediction on a tie, so it keeps {b}; the second
    # sentence [a] adds {a}: union {a, b} = m = n = 2, F = 1 (tracing {a} instead would give 0.5).
    assert rouge_score("b a. a", "a b") == approx(1.0, abs=1e-7)


def test_rouge_l_empty_and_identical():
    assert rouge_score("", "a summary") == 0.0
    assert rouge_score("...", "a summary") == 0.0  # only sentence separators: no sentence at all
    assert rouge_score("a summary", "") == 0.0
    assert rouge_score("One. Two three.", "One. Two three.") == approx(1.0, abs=1e-7)
    assert rouge_score("Case", "case") == 0.0  # no lowercasing in ROUGE


def test_rouge_zh_segments_first():
    # characters joined by spaces: [北 京 很 大] vs [北 京 大]: LCS {北, 京, 大} = 3, m = 3, n = 4
    assert rouge_zh_score("北京很大", "北京大", segment=characters) == approx(2 * 0.75 / 1.75, abs=1e-7)


# ---------------------------------------------------------------- classification, retrieval, count, code


def test_classification_score():
    classes = ["Food", "Food and drink", "City"]
    # "Food" is a strict substring of the gold class and is dropped: only the gold remains -> 1
    assert classification_score("Food and drink", "Food and drink", classes) == 1.0
    # three names found, none dropped -> 1/3
    assert classification_score("City or Food and drink", "City", classes) == approx(1 / 3)
    assert classification_score("Food", "City", classes) == 0.0
    assert classification_score("", "City", classes) == 0.0


def test_classification_score_keeps_longbench_iteration_quirk():
    # matches [ab, a, b, abc]; removing "ab" makes the loop skip "a", then "b" is removed: [a, abc] -> 1/2
    assert classification_score("abc", "abc", ["ab", "a", "b", "abc"]) == 0.5


def test_retrieval_and_count_scores():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert retrieval_score("Paragraph 13", "Paragraph 3") == 0.0  # whole numbers compared
    assert retrieval_zh_score("段落7", "段落7") == 1.0
    with pytest.raises(ValueError, match="must contain 'Paragraph <n>'"):
        retrieval_score("3", "third one")
    assert count_score("There are 12 unique paragraphs: 12", "12") == 1.0
    assert count_score("10 or 12", "12") == 0.5
    assert count_score("many", "12") == 0.0


def test_fuzz_ratio_and_code_similarity():
    assert fuzz_ratio("abcd", "abce") == 75  # 2 * 3 / 8
    assert fuzz_ratio("abc", "abd") == 67  # 2 * 2 / 6 = 0.667, rounded
    assert fuzz_ratio("abc", "abd", backend="levenshtein") == 67
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "x") == 0
    prediction = "```python\n# add one\nreturn x + 1\nmore"
    assert code_sim_score(prediction, "return x + 1") == 1.0  # fences and comments skipped
    assert code_sim_score("\n\nabcd", "abce") == 0.75  # leading newlines stripped
    assert code_sim_score("# only comments\n// here", "x = 1") == 0.0  # nothing left: empty line


def test_release_code_similarity_compares_the_whole_prediction_when_no_line_is_code():
    """The paper's release falls back to the whole prediction where LongBench compares an empty line."""
    prediction, gold = "        self.x = x  # store x", "self.x = x"
    whole = fuzz_ratio(prediction, gold) / 100
    assert whole > 0.5
    assert longbench_score("lcc", prediction, [gold]) == 0.0
    assert longbench_score("lcc", prediction, [gold], scoring="refine-release") == whole
    assert longbench_score("repobench-p", "```python", ["import os"], scoring="refine-release") == (
        fuzz_ratio("```python", "import os") / 100)
    # A line without comment marks is what both compare.
    assert longbench_score("lcc", "# a\nreturn x", ["return x"], scoring="refine-release") == 1.0
    with pytest.raises(ValueError, match="fuzz backend"):
        fuzz_ratio("a", "b", backend="other")


# ---------------------------------------------------------------- RULER


def test_ruler_string_matches():
    assert string_match_part("The answer is PARIS", ["paris", "london"]) == 1.0
    assert string_match_part("Berlin", ["paris", "london"]) == 0.0
    assert string_match_all("7 and 9", ["7", "9", "11"]) == approx(2 / 3)
    assert string_match_all("", ["7"]) == 0.0
    with pytest.raises(ValueError, match="at least one gold answer"):
        string_match_all("x", [])


def test_ruler_postprocess_and_qa_first_line():
    assert ruler_postprocess("  Par\x01is \t") == "Par\nis"
    assert ruler_qa_score("Paris\nLondon", ["london"]) == 0.0  # only the first line counts
    assert ruler_qa_score("Paris\nLondon", ["PARIS"]) == 1.0
    assert ruler_qa_score("\nParis", ["paris"]) == 0.0  # the first line is empty
    assert ruler_official_qa_score("\nParis", ["paris"]) == 1.0  # RULER's own rule reads everything
    assert ruler_qa_score("", ["paris"]) == 0.0


def test_ordered_recall_compares_whole_values_in_their_places():
    assert ordered_recall_score(" 482 193 557 610", ["482", "193", "557", "610"]) == 1.0
    assert ordered_recall_score("482, 193 then", ["482", "193", "557", "610"]) == 0.5  # punctuation is no word
    assert ordered_recall_score("4821 193", ["482", "193"]) == 0.5  # a longer number is another value
    assert ordered_recall_score("193 482", ["482", "193"]) == 0.0  # out of order
    assert ordered_recall_score(" Ada Lovelace. The rest", ["ada lovelace"]) == 1.0  # fact recall: several words
    assert ordered_recall_score(" Adam Lovelace", ["ada lovelace"]) == 0.0
    # A value of several words moves the place past all of them: the next value is read after "york".
    assert ordered_recall_score("new york paris", ["new york", "paris"]) == 1.0
    assert ordered_recall_score("", ["1"]) == 0.0
    with pytest.raises(ValueError):
        ordered_recall_score("x", [])


def test_niah_needs_every_value():
    assert niah_score(" 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert niah_score("1234567", ["1234567", "7654321"]) == 0.5
    assert niah_score("", ["1234567"]) == 0.0


# ---------------------------------------------------------------- LongBench rules and aggregation


def test_longbench_max_over_gold_answers_and_first_line_rule():
    # qa_f1("Miller", "Gates v Collier") = 0; qa_f1("Miller", "Miller v California"): P = 1, R = 1/3 -> 1/2
    assert longbench_score("hotpotqa", "Miller", ["Gates v. Collier", "Miller v. California"]) == approx(0.5)
    # triviaqa keeps only the first line after leading newlines
    assert longbench_score("triviaqa", "\nParis\nLondon", ["London"]) == 0.0
    assert longbench_score("triviaqa", "\nParis\nLondon", ["Paris"]) == 1.0
    # hotpotqa reads all lines: [paris, london] vs [london] -> 2/3
    assert longbench_score("hotpotqa", "Paris\nLondon", ["London"]) == approx(2 / 3)
    assert longbench_score("hotpotqa_e", "Paris", ["Paris"]) == 1.0
    assert longbench_score("trec", "Type: City\nFood", ["City"], all_classes=["City", "Food"]) == 1.0
    with pytest.raises(ValueError, match="all_classes is required"):
        longbench_score("trec", "City", ["City"])
    with pytest.raises(ValueError, match="unknown LongBench dataset 'nope'"):
        longbench_score("nope", "x", ["x"])
    assert longbench_score("hotpotqa", "", ["Paris"]) == 0.0


def test_task_metric_table():
    assert task_metric("gov_report").metric == "rouge_score"
    assert task_metric("lcc").metric == "code_sim_score"
    assert task_metric("trec").needs_all_classes
    assert task_metric("ruler_hotpotqa").metric == "string_match_part (first line)"
    assert task_metric("qa_1").metric == "string_match_part"
    assert task_metric("niah_multikey_2").metric == "string_match_all"
    assert task_metric("mqar").score("1 2", ["1", "2"], None) == 1.0
    with pytest.raises(ValueError, match="unknown task 'summarize'.*known tasks"):
        task_metric("summarize")


def test_gold_problem_names_what_a_metric_cannot_score():
    trec = task_metric("trec")
    assert trec.gold_problem(["City"], ["City", "Food"]) is None
    for classes in (None, [], [3]):
        assert "classification task and needs 'all_classes'" in trec.gold_problem(["City"], classes)
    retrieval = task_metric("passage_retrieval_en_e")
    assert retrieval.gold_problem(["Paragraph 3", "Paragraph 12"], None) is None
    assert retrieval.gold_problem(["Paragraph 3", "3"], None) == (
        "task 'passage_retrieval_en_e' needs every gold answer to contain 'Paragraph <n>', got '3'"
    )
    assert task_metric("passage_retrieval_zh").gold_problem(["段落7"], None) is None
    assert "'段落<n>'" in task_metric("passage_retrieval_zh").gold_problem(["Paragraph 7"], None)
    for name in ("hotpotqa", "passage_count", "ruler_qa", "niah_single"):
        assert task_metric(name).gold_problem(["3"], None) is None
    # A count spelled out, or not a whole number, never equals a number in the prediction: it scored 0, silently.
    for gold in ("three", "3.0", " 3"):
        assert task_metric("passage_count_e").gold_problem(["12", gold], None) == (
            f"task 'passage_count_e' counts: every gold answer must be a whole number in digits, got {gold!r}")


def test_aggregation():
    assert aggregate([1.0, 0.0, 0.5]) == 50.0
    assert aggregate([1 / 3] * 3) == 33.33
    with pytest.raises(ValueError, match="empty"):
        aggregate([])
    # Each benchmark's order of operations: LongBench round(100 * sum / n), RULER round(sum / n * 100).
    hits = [1.0] * 23 + [0.0] * 137
    assert (aggregate(hits), ruler_aggregate(hits)) == (14.38, 14.37)
    assert task_metric("hotpotqa").task_score(hits) == 14.38
    for ruler_task in ("niah_single_1", "qa_1", "ruler_qa", "mqar"):
        assert task_metric(ruler_task).task_score(hits) == 14.37, ruler_task
    by_length = aggregate_by_length([1.0, 0.0, 1.0], [100, 5000, 9000])
    assert by_length == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    assert aggregate_by_length([1.0], [10]) == {"0-4k": 100.0, "4-8k": None, "8k+": None}


def test_aggregates_add_up_as_longbench_does():
    """eval.py's scorer adds scores one at a time (Python 3.12's sum() compensates: 46.87 there) and its
    scorer_e takes np.mean (pairwise) and np.round; both cases differed from the official code in review."""
    scores = [0.7777777777777777, 0.4999999999999999, 0.22222222222222224, 0.375]
    assert aggregate(scores) == task_metric("hotpotqa").task_score(scores) == 46.88
    code = [0.24, 0.3, 1.0, 0.75, 0.53, 0.2, 0.14, 0.57]  # one bucket: round(100 * sum / n, 2) gives 46.63
    assert aggregate_by_length(code, [9000] * 8) == {"0-4k": None, "4-8k": None, "8k+": 46.62}


def test_only_longbench_e_datasets_take_the_e_suffix():
    assert longbench_task_name("hotpotqa_e") == "hotpotqa" and longbench_task_name("lcc_e") == "lcc"
    assert longbench_task_name("narrativeqa_e") is None  # in LongBench, not in LongBench-E
    with pytest.raises(ValueError, match="unknown task 'narrativeqa_e'; known tasks: .*'hotpotqa_e'"):
        task_metric("narrativeqa_e")


def test_the_levenshtein_backend_without_rapidfuzz_is_a_clear_error(monkeypatch):
    import sys

    from refine.evaluation.metrics import code_sim_score

    monkeypatch.setitem(sys.modules, "rapidfuzz.distance", None)  # as if rapidfuzz were not installed
    with pytest.raises(ValueError, match="'levenshtein' code-similarity backend needs rapidfuzz"):
        code_sim_score("a = 1", "a = 2", backend="levenshtein")


def test_refine_release_longbench_scoring_follows_the_papers_rules():
    from refine.evaluation.metrics import RELEASE_TREC_CLASSES, longbench_score, task_metric

    answer = "Oslo is it\nmore words follow here"
    # QA answers: LongBench scores the whole answer, the release its first line only.
    assert longbench_score("hotpotqa", answer, ["Oslo"]) == pytest.approx(2 * (1 / 7) / (1 / 7 + 1))
    assert longbench_score("hotpotqa", answer, ["Oslo"], scoring="refine-release") == pytest.approx(0.5)
    # trec: the release matches against its fixed class list whatever the row's classes are.
    assert longbench_score("trec", "Country or City", ["City"], all_classes=["City", "Food"]) == 1.0
    assert longbench_score("trec", "Country or City", ["City"], scoring="refine-release") == 0.5
    assert {"City", "Country"} <= set(RELEASE_TREC_CLASSES) and len(RELEASE_TREC_CLASSES) == 50
    assert not task_metric("trec", longbench_scoring="refine-release").needs_all_classes
    with pytest.raises(ValueError, match="refine-release scoring has no rule for LongBench dataset 'passage_count'"):
        task_metric("passage_count", longbench_scoring="refine-release")


def test_longbench_takes_the_best_gold_answer_wherever_it_stands():
    """max over the gold answers, as eval.py's scorer: the best one first, then last."""
    answers = ["Miller v. California", "Gates v. Collier"]
    assert longbench_score("hotpotqa", "Miller", answers) == pytest.approx(0.5)  # F1 of 1 of 3 tokens
    assert longbench_score("hotpotqa", "Miller", answers[::-1]) == pytest.approx(0.5)


def test_longbench_e_length_buckets_start_at_4000_and_8000():
    """eval.py's scorer_e: length < 4000, 4000 <= length < 8000, 8000 and more."""
    assert aggregate_by_length([1, 0, 1, 0], [3999, 4000, 7999, 8000]) == {"0-4k": 100.0, "4-8k": 50.0, "8k+": 0.0}
