"""Benchmark metrics, scored exactly as LongBench (`LongBench/metrics.py`, `eval.py`) and RULER
(`scripts/eval/synthetic/constants.py`, `evaluate.py`) score them, quirks included, so numbers compare
with published ones.

Per-example functions return a value in [0, 1]; a task's score is their mean x 100, rounded to 2 decimals
in each benchmark's own order of operations (`aggregate`: LongBench's; `ruler_aggregate`: RULER's), which
`TaskMetric.task_score` picks.

Notes on fidelity:
- ROUGE-L is the `rouge` package (1.0.1, which LongBench uses) re-implemented: sentences split on ".",
  words on " ", word *sets* (not counts), the union-LCS over reference x prediction sentences with that
  package's LCS back-tracking, and F = 2PR / (P + R + 1e-8). An empty prediction or reference scores 0
  (the package raises there and LongBench returns 0). The package's recursive back-tracking overflows
  Python's stack on sentences of about a thousand words (LongBench then scores 0); ours is iterative.
- code_sim uses fuzzywuzzy's `ratio` as LongBench pins it (fuzzywuzzy without python-Levenshtein, so
  difflib's SequenceMatcher): int(round(100 * ratio)) / 100, 1 when equal, 0 when either is empty.
  backend="levenshtein" gives fuzzywuzzy-with-python-Levenshtein scores (rapidfuzz's Indel ratio).
- classification_score keeps LongBench's removal-while-iterating over the matched class names (it skips
  the element after each removal), because that decides ties.
- Chinese metrics segment with jieba, as LongBench does (`pip install jieba`).
- A row's own `all_classes` scores it; eval.py scores a whole file with its last row's list, the same list
  in every LongBench file, so this differs only for hand-made files mixing class lists.
- Checked against the official code (LongBench 2e00731, RULER c3f5e3b, the REFINE release 73b5b66) on
  thousands of random and hand-picked predictions: equal in every per-example function, dataset score and
  aggregate, apart from the long-sentence ROUGE case above.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

# ---------------------------------------------------------------- normalization

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)
# The CJK / full-width punctuation LongBench strips from Chinese answers. It is LongBench's set exactly:
# note it holds the closing "》" but not the opening "《", and not the full-width full stop "．".
_CHINESE_PUNCTUATION = frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ALL_PUNCTUATION = _ASCII_PUNCTUATION | _CHINESE_PUNCTUATION


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a / an / the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, remove all whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ALL_PUNCTUATION)
    return "".join(text.split())


def _jieba_segment(text: str) -> list[str]:
    try:
        import jieba
    except ImportError as error:
        raise ImportError("Chinese LongBench metrics segment words with jieba: pip install jieba") from error
    import logging

    jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO on first use
    return list(jieba.cut(text, cut_all=False))


Segmenter = Callable[[str], Iterable[str]]

# ---------------------------------------------------------------- token F1


def f1_score(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap)."""
    return _counted_f1(Counter(prediction_tokens), len(prediction_tokens), ground_truth_tokens)


def best_f1_score(prediction_tokens: Sequence[str], answers_tokens: Sequence[Sequence[str]]) -> float:
    """The largest f1_score of the prediction against each answer, the prediction's tokens counted once."""
    counts = Counter(prediction_tokens)
    return max(_counted_f1(counts, len(prediction_tokens), answer) for answer in answers_tokens)


def _counted_f1(prediction_counts: Counter[str], num_predicted: int, ground_truth_tokens: Sequence[str]) -> float:
    num_same = sum((prediction_counts & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / num_predicted
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, segment: Segmenter | None = None) -> float:
    segment = segment or _jieba_segment

    def tokens(text: str) -> list[str]:
        normalized = (normalize_zh_answer(token) for token in segment(text))
        return [token for token in normalized if token]

    return f1_score(tokens(prediction), tokens(ground_truth))


# ---------------------------------------------------------------- ROUGE-L


def _rouge_sentences(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(".") if len(part) > 0]


def _lcs_word_set(reference: list[str], candidate: list[str]) -> set[str]:
    """Words of one longest common subsequence, traced back as the rouge package traces it."""
    rows, cols = len(reference), len(candidate)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        above, current = table[i - 1], table[i]
        word = reference[i - 1]
        for j in range(1, cols + 1):
            current[j] = above[j - 1] + 1 if word == candidate[j - 1] else max(above[j], current[j - 1])
    words: set[str] = set()
    i, j = rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F (summary level), as `rouge.Rouge().get_scores(...)["rouge-l"]["f"]`."""
    predicted, reference = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
    if not predicted or not reference:
        return 0.0
    reference_words = [sentence.split(" ") for sentence in reference]
    predicted_words = [sentence.split(" ") for sentence in predicted]
    num_reference = len({word for sentence in reference_words for word in sentence})
    num_predicted = len({word for sentence in predicted_words for word in sentence})
    union: set[str] = set()
    for reference_sentence in reference_words:
        for predicted_sentence in predicted_words:
            union |= _lcs_word_set(reference_sentence, predicted_sentence)
    recall = len(union) / num_reference
    precision = len(union) / num_predicted
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_zh_score(prediction: str, ground_truth: str, segment: Segmenter | None = None) -> float:
    segment = segment or _jieba_segment
    return rouge_score(" ".join(segment(prediction)), " ".join(segment(ground_truth)))


# ---------------------------------------------------------------- classification, retrieval, counting, code


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """1 / (number of class names found in the prediction) when the gold class is among them, else 0.
    Names that are strict substrings of the gold class are dropped from the matches first."""
    matches = [name for name in all_classes if name in prediction]
    # LongBench removes from the list it iterates over, which skips the element after each removal;
    # this loop walks indices the same way.
    position = 0
    while position < len(matches):
        term = matches[position]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        position += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for number in numbers if number == target) / len(numbers)


# The paragraph number LongBench's retrieval tasks read from each gold answer, and how errors name it.
_RETRIEVAL_GOLD = {
    "retrieval_score": (r"Paragraph (\d+)", "'Paragraph <n>'"),
    "retrieval_zh_score": (r"段落(\d+)", "'段落<n>'"),
}


def _paragraph_number(ground_truth: str, metric_name: str) -> str:
    pattern, shape = _RETRIEVAL_GOLD[metric_name]
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"retrieval gold answer must contain {shape}, got {ground_truth!r}")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction equal to the gold "Paragraph N" number."""
    return _number_share(prediction, _paragraph_number(ground_truth, "retrieval_score"))


def retrieval_zh_score(prediction: str, ground_truth: str) -> float:
    return _number_share(prediction, _paragraph_number(ground_truth, "retrieval_zh_score"))


def count_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction equal to the gold count."""
    return _number_share(prediction, str(ground_truth))


FuzzBackend = Literal["difflib", "levenshtein"]


def fuzz_ratio(first: str, second: str, backend: FuzzBackend = "difflib") -> int:
    """fuzzywuzzy's `fuzz.ratio`: 100 when equal, 0 when either is empty, else int(round(100 * ratio))."""
    if first == second:
        return 100
    if not first or not second:
        return 0
    if backend == "difflib":
        ratio = difflib.SequenceMatcher(None, first, second).ratio()
    elif backend == "levenshtein":
        try:
            from rapidfuzz.distance import Indel
        except ImportError:
            raise ValueError("the 'levenshtein' code-similarity backend needs rapidfuzz: pip install rapidfuzz, "
                             "or use the 'difflib' backend") from None

        ratio = Indel.normalized_similarity(first, second)
    else:
        raise ValueError(f"fuzz backend must be 'difflib' or 'levenshtein', got {backend!r}")
    return int(round(100 * ratio))


def code_sim_score(prediction: str, ground_truth: str, backend: FuzzBackend = "difflib",
                   whole_without_code_line: bool = False) -> float:
    """Similarity of the first prediction line that is not a comment or a code fence to the gold line. When
    no line qualifies LongBench compares an empty string; the paper's release (`whole_without_code_line`)
    compares the whole prediction, as its loop stores the line it finds under another name."""
    first_code_line = prediction if whole_without_code_line else ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return fuzz_ratio(first_code_line, ground_truth, backend) / 100


# ---------------------------------------------------------------- RULER

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def ruler_postprocess(prediction: str) -> str:
    """RULER's cleaning: strip, turn control characters into newlines, strip again."""
    return _CONTROL_CHARACTERS.sub("\n", prediction.strip()).strip()


def _require_references(references: Sequence[str]) -> None:
    if len(references) == 0:
        raise ValueError("string match needs at least one gold answer, got none")


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 when any gold answer occurs in the prediction (case-insensitive), else 0."""
    _require_references(references)
    lowered = prediction.lower()
    return max(1.0 if reference.lower() in lowered else 0.0 for reference in references)


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Share of the gold answers that occur in the prediction (case-insensitive)."""
    _require_references(references)
    lowered = prediction.lower()
    return sum(1.0 if reference.lower() in lowered else 0.0 for reference in references) / len(references)


def ruler_qa_score(prediction: str, answers: Sequence[str]) -> float:
    """RULER QA as the REFINE release scores it: the prediction's first line, cleaned, must contain a gold answer."""
    return string_match_part(ruler_postprocess(prediction.split("\n")[0]), answers)


def ruler_official_qa_score(prediction: str, answers: Sequence[str]) -> float:
    """RULER's own QA score: the whole cleaned prediction must contain a gold answer."""
    return string_match_part(ruler_postprocess(prediction), answers)


def niah_score(prediction: str, answers: Sequence[str]) -> float:
    """Needle tasks: the share of all needle values found in the cleaned prediction."""
    return string_match_all(ruler_postprocess(prediction), answers)


def ordered_recall_score(prediction: str, answers: Sequence[str]) -> float:
    """Synthetic recall (MQAR, fact recall), whose prompts ask for the gold values in order: the share of them the
    prediction gives in their place. Words (runs of letters and digits, case-insensitive) are compared: the i-th
    value must be the prediction's words at its place after the values before it, so a value inside a longer
    number or out of order does not count (a substring test counted "482" in "4821"), and words past the last
    value are not read."""
    _require_references(answers)
    words = re.findall(r"\w+", prediction.lower())
    place, found = 0, 0
    for answer in answers:
        expected = re.findall(r"\w+", answer.lower())
        found += words[place:place + len(expected)] == expected
        place += len(expected)
    return found / len(answers)


# ---------------------------------------------------------------- per-task scoring rules

_LONGBENCH_METRICS: dict[str, str] = {
    "narrativeqa": "qa_f1_score",
    "qasper": "qa_f1_score",
    "multifieldqa_en": "qa_f1_score",
    "multifieldqa_zh": "qa_f1_zh_score",
    "hotpotqa": "qa_f1_score",
    "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score",
    "dureader": "rouge_zh_score",
    "gov_report": "rouge_score",
    "qmsum": "rouge_score",
    "multi_news": "rouge_score",
    "vcsum": "rouge_zh_score",
    "trec": "classification_score",
    "triviaqa": "qa_f1_score",
    "samsum": "rouge_score",
    "lsht": "classification_score",
    "passage_retrieval_en": "retrieval_score",
    "passage_count": "count_score",
    "passage_retrieval_zh": "retrieval_zh_score",
    "lcc": "code_sim_score",
    "repobench-p": "code_sim_score",
}
# Few-shot tasks whose predictions are cut to their first non-empty-leading line before scoring.
LONGBENCH_FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# The paper's release scores LongBench its own way (ReFINE's verl/utils/reward_score/longbench.py), which
# LongBenchScoring "refine-release" reproduces to compare with the paper's tables: only these English
# datasets; single/multi-document QA answers cut to their first line too; predictions stripped before the
# QA, ROUGE and classification metrics; trec classified against one fixed list (below), not the row's.
LongBenchScoring = Literal["longbench", "refine-release"]
RELEASE_LONGBENCH_TASKS = frozenset({
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "samsum", "qmsum",
    "multi_news", "trec", "triviaqa", "lcc", "repobench-p",
})
RELEASE_FIRST_LINE_QA_TASKS = frozenset({"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"})
RELEASE_TREC_CLASSES = (
    "Food", "Date", "Order, rank", "Speed", "Disease and medicine", "Word with a special property", "Abbreviation",
    "Language", "Letter like a-z", "Other entity", "Animal", "Expression abbreviated", "Price",
    "Techniques and method", "Musical instrument", "Mountain", "Currency name", "Event", "Product", "State",
    "Individual", "Organ of body", "Reason", "Manner of an action", "City", "Religion",
    "Invention, book and other creative piece", "Distance, linear measure", "Temperature", "Postcode or other code",
    "Size, area and volume", "Sport", "Country", "Other location", "Lasting time of somethin", "Equivalent term",
    "Description of something", "Weight", "Vehicle", "Color", "Other number", "Definition of something",
    "Element and substance", "Description of a person", "Symbols and sign", "Number of something", "Plant",
    "Percent, fraction", "Group or organization of person", "Title of a person",
)

_PAIR_METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": qa_f1_score,
    "qa_f1_zh_score": qa_f1_zh_score,
    "rouge_score": rouge_score,
    "rouge_zh_score": rouge_zh_score,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "retrieval_zh_score": retrieval_zh_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
}

RULER_ALL_MATCH_TASKS = frozenset(
    {"niah", "vt", "cwe", "fwe", "variable_tracking", "common_words_extraction", "freq_words_extraction"}
)
# Synthetic tasks of refine.data.synthetic whose prompts ask for the gold values in order (ordered_recall_score).
SYNTHETIC_TASKS = frozenset({"mqar", "fact_recall"})


# The datasets LongBench-E has ("_e" task names): eval.py's list for its length-bucketed scores.
LONGBENCH_E_DATASETS = frozenset({
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
})


def longbench_task_name(task: str) -> str | None:
    """The LongBench dataset a task name refers to ("hotpotqa", "hotpotqa_e" -> "hotpotqa"), or None; an "_e"
    name only for a dataset LongBench-E has."""
    if task.endswith("_e"):
        return task[:-2] if task[:-2] in LONGBENCH_E_DATASETS else None
    return task if task in _LONGBENCH_METRICS else None


def longbench_score(
    dataset: str,
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
    code_backend: FuzzBackend = "difflib",
    scoring: LongBenchScoring = "longbench",
) -> float:
    """One example scored as LongBench's eval.py does (or, with scoring="refine-release", as the paper's
    release does): max of the dataset's metric over the gold answers."""
    name = longbench_task_name(dataset)
    if name is None:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; known: {sorted(_LONGBENCH_METRICS)}")
    metric_name = _LONGBENCH_METRICS[name]
    release = scoring == "refine-release"
    if release:
        if name not in RELEASE_LONGBENCH_TASKS:
            raise ValueError(f"the refine-release scoring has no rule for LongBench dataset {dataset!r}; it scores "
                             f"{sorted(RELEASE_LONGBENCH_TASKS)}")
        if name == "trec":
            all_classes = RELEASE_TREC_CLASSES
    if metric_name == "classification_score" and all_classes is None:
        raise ValueError(f"LongBench dataset {dataset!r} is a classification task: all_classes is required")
    if name in LONGBENCH_FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    elif release and name in RELEASE_FIRST_LINE_QA_TASKS:
        prediction = prediction.split("\n")[0]
    if release and metric_name != "code_sim_score":
        prediction = prediction.strip()
    metric = _PAIR_METRICS[metric_name]
    score = 0.0
    for ground_truth in answers:
        if metric_name == "classification_score":
            value = metric(prediction, ground_truth, all_classes)
        elif metric_name == "code_sim_score":
            value = metric(prediction, ground_truth, backend=code_backend, whole_without_code_line=release)
        else:
            value = metric(prediction, ground_truth)
        score = max(score, value)
    return score


def aggregate(scores: Sequence[float]) -> float:
    """Task score as LongBench reports it: round(100 * sum / n, 2), the sum added up one score at a time as
    eval.py does (Python 3.12's sum() compensates rounding, which can move the second decimal)."""
    if len(scores) == 0:
        raise ValueError("cannot aggregate an empty list of scores")
    total = 0.0
    for score in scores:
        total += score
    return round(100 * total / len(scores), 2)


def ruler_aggregate(scores: Sequence[float]) -> float:
    """Task score as RULER reports it: round(sum / n * 100, 2). The same number as `aggregate` but for
    floating-point rounding, which can move the second decimal (23 of 160: 14.37 here, 14.38 there)."""
    if len(scores) == 0:
        raise ValueError("cannot aggregate an empty list of scores")
    return round(sum(scores) / len(scores) * 100, 2)


@dataclass(frozen=True)
class TaskMetric:
    """How one task's examples are scored."""

    task: str
    metric: str  # the benchmark's metric name, reported in summaries
    needs_all_classes: bool
    score: Callable[[str, Sequence[str], Sequence[str] | None], float]
    task_score: Callable[[Sequence[float]], float] = aggregate  # mean x 100, as its benchmark rounds it

    def gold_problem(self, answers: Sequence[str], all_classes: Sequence[str] | None) -> str | None:
        """Why this metric cannot score an example with these gold answers and classes, or None when it can.
        Callers check every example before generating, and name the example in the error."""
        if self.needs_all_classes and not (
            isinstance(all_classes, (list, tuple)) and all_classes and all(isinstance(c, str) for c in all_classes)
        ):
            return (f"task {self.task!r} is a classification task and needs 'all_classes' (a list of class names), "
                    f"got {all_classes!r:.120}")
        if self.metric in _RETRIEVAL_GOLD:
            pattern, shape = _RETRIEVAL_GOLD[self.metric]
            for answer in answers:
                if not re.search(pattern, answer):
                    return f"task {self.task!r} needs every gold answer to contain {shape}, got {answer!r:.120}"
        if self.metric == "count_score":  # a prediction's numbers are compared with it as digits
            for answer in answers:
                if not re.fullmatch(r"\d+", answer):
                    return (f"task {self.task!r} counts: every gold answer must be a whole number in digits, got "
                            f"{answer!r:.120}")
        return None


def task_metric(task: str, code_backend: FuzzBackend = "difflib",
                longbench_scoring: LongBenchScoring = "longbench") -> TaskMetric:
    """The scoring rule for a task name: a LongBench dataset (optionally "_e"; `longbench_scoring` picks
    LongBench's rules or the paper release's), "ruler_qa" (also any "ruler_*qa"), RULER's "qa_1"/"qa_2",
    "niah" / "niah_*" and RULER's other all-match tasks, "mqar", "fact_recall"."""
    name = task.strip()
    if name == "ruler-qa":  # `refine eval --task`'s spelling of the same rule
        name = "ruler_qa"
    if name == "longbench":
        raise ValueError("task 'longbench' names the suite, whose datasets score by different rules: name the "
                         f"dataset (one of {sorted(_LONGBENCH_METRICS)})")
    longbench = longbench_task_name(name)
    if longbench is not None:
        metric_name = _LONGBENCH_METRICS[longbench]
        release = longbench_scoring == "refine-release"
        if release and longbench not in RELEASE_LONGBENCH_TASKS:
            raise ValueError(f"the refine-release scoring has no rule for LongBench dataset {name!r}; it scores "
                             f"{sorted(RELEASE_LONGBENCH_TASKS)}")
        return TaskMetric(
            task=name,
            metric=metric_name + (" (REFINE release)" if release else ""),
            needs_all_classes=metric_name == "classification_score" and not release,
            score=lambda prediction, answers, all_classes: longbench_score(
                longbench, prediction, answers, all_classes, code_backend, longbench_scoring
            ),
        )
    if name == "ruler_qa" or (name.startswith("ruler_") and name.endswith("qa")):
        return TaskMetric(name, "string_match_part (first line)", False, lambda p, a, _c: ruler_qa_score(p, a),
                          ruler_aggregate)
    if name in ("qa", "qa_1", "qa_2"):
        return TaskMetric(name, "string_match_part", False, lambda p, a, _c: ruler_official_qa_score(p, a),
                          ruler_aggregate)
    if name in RULER_ALL_MATCH_TASKS or name.startswith("niah_"):
        return TaskMetric(name, "string_match_all", False, lambda p, a, _c: niah_score(p, a), ruler_aggregate)
    if name in SYNTHETIC_TASKS:
        return TaskMetric(name, "ordered_recall", False, lambda p, a, _c: ordered_recall_score(p, a), ruler_aggregate)
    known = sorted(_LONGBENCH_METRICS) + [f"{name}_e" for name in sorted(LONGBENCH_E_DATASETS)]
    known += ["ruler_qa", "qa_1", "qa_2", "niah", "niah_*"]
    known += sorted(RULER_ALL_MATCH_TASKS - {"niah"}) + sorted(SYNTHETIC_TASKS)
    raise ValueError(f"unknown task {task!r}; known tasks: {known}")


LENGTH_BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, None))


def aggregate_by_length(scores: Sequence[float], lengths: Sequence[int]) -> dict[str, float | None]:
    """LongBench-E's report: task score per input-length bucket, round(100 * np.mean, 2) as eval.py's scorer_e
    computes it (numpy's pairwise sum and rounding, which can differ from `aggregate` in the second decimal);
    None for an empty bucket, where eval.py reports NaN."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores but {len(lengths)} lengths")
    result: dict[str, float | None] = {}
    for label, low, high in LENGTH_BUCKETS:
        bucket = [s for s, n in zip(scores, lengths) if n >= low and (high is None or n < high)]
        result[label] = float(np.round(100 * np.mean(np.asarray(bucket, dtype=np.float64)), 2)) if bucket else None
    return result
