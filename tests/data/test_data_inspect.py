"""`refine data inspect`: a source summarized as training reads it."""

import json
import math
import random
import statistics
from itertools import islice

import pytest

from refine.cli import main
from refine.config import load_config, run_tokenizer
from refine.data.inspect import LengthCounts, inspect_data
from refine.data.stream import document_stream


def _source(tmp_path):
    """With BOS: 31, 5, 101 and 61 tokens; blank line 3 is not a record, "   " is a blank document."""
    path = tmp_path / "docs.jsonl"
    texts = ["a" * 30, "tiny", "b" * 100, "   ", "c" * 60]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[:2]) + "\n"
                    + "".join(json.dumps({"text": text}) + "\n" for text in texts[2:]))
    return path


def _config(tmp_path, *extra):
    return load_config(None, [f"data.source={_source(tmp_path)}", "data.seq_len=40", "data.min_length=20",
                              "train.mode=ntp", "train.batch_size=2", *extra])


def test_a_whole_pass_is_summarized_as_training_reads_it(tmp_path):
    config = _config(tmp_path, "data.max_windows=3")
    summary = inspect_data(config, run_tokenizer(config), max_documents=None)
    # 31 | 40 40 21 (101 tokens in windows of 40) | 40 21 (61): the blank and the short record dropped.
    assert summary["whole_pass"] and summary["documents"] == 6 and summary["tokens"] == 31 + 40 + 40 + 21 + 40 + 21
    assert summary["document_tokens"] == {"min": 21, "median": 35.5, "p90": 40, "max": 40, "mean": 32.2}
    assert summary["full_length_share"] == pytest.approx(3 / 6)
    assert summary["read"] == {"records_read": 5, "too_short": 1, "blank": 1, "truncated": 0, "split": 2,
                               "short_tails": 0, "bad_rows": 0}
    assert summary["first_documents"] == ["docs.jsonl:1", "docs.jsonl:4", "docs.jsonl:4#1", "docs.jsonl:4#2",
                                          "docs.jsonl:6"]
    assert summary["steps_per_pass"] == 3
    # The documents a run trains on, in its order.
    trained = [doc_id for doc_id, _, _ in islice(document_stream(config, run_tokenizer(config)), 5)]
    assert summary["first_documents"] == trained


def test_a_limited_read_says_it_is_not_a_whole_pass(tmp_path):
    config = _config(tmp_path)
    summary = inspect_data(config, run_tokenizer(config), max_documents=2)
    assert summary["documents"] == 2 and not summary["whole_pass"] and "steps_per_pass" not in summary
    whole = inspect_data(config, run_tokenizer(config), max_documents=3)  # exactly the pass: complete
    assert whole["documents"] == 3 and whole["whole_pass"] and whole["steps_per_pass"] == 2


def test_the_command_prints_json_and_refuses_a_negative_count(tmp_path, capsys):
    source = _source(tmp_path)
    overrides = ["--set", f"data.source={source}", "--set", "data.seq_len=40", "--set", "data.min_length=20",
                 "--set", "train.mode=ntp"]
    assert main(["data", "inspect", *overrides, "--documents", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 3
    assert main(["data", "inspect", *overrides, "--documents", "-1"]) == 2
    assert "--documents must be >= 0 (0: one whole pass), got -1" in capsys.readouterr().err
    assert main(["data", "inspect", "--set", "data.min_length=1000000"]) == 2  # a source that keeps nothing
    assert "refine: error:" in capsys.readouterr().err


def test_a_limited_read_counts_only_the_records_up_to_its_last_document(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 4}) + "\n" for i in range(4)) + "{broken\n"
                    + "".join(json.dumps({"text": f"document {i} " * 4}) + "\n" for i in range(4, 70)))
    config = load_config(None, [f"data.source={path}", "data.seq_len=64", "data.min_length=40", "train.mode=ntp"])
    # The bad row (line 5) is past the first 4 documents: neither counted nor failing the read.
    summary = inspect_data(config, run_tokenizer(config), max_documents=4)
    assert summary["read"]["records_read"] == 4 and summary["read"]["bad_rows"] == 0 and not summary["whole_pass"]
    skipping = load_config(None, [f"data.source={path}", "data.seq_len=64", "data.min_length=40", "train.mode=ntp",
                                  "data.skip_bad_rows=true"])
    summary = inspect_data(skipping, run_tokenizer(skipping), max_documents=10)
    assert summary["read"]["records_read"] == 11 and summary["read"]["bad_rows"] == 1


def test_a_limited_read_that_reaches_the_end_of_the_pass_counts_the_whole_pass(tmp_path):
    path = tmp_path / "tail.jsonl"
    texts = ["a" * 30, "b" * 30, "c" * 30, "x", "   ", "y"]  # the last three give no document
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    config = load_config(None, [f"data.source={path}", "data.seq_len=40", "data.min_length=10", "train.mode=ntp"])
    whole = inspect_data(config, run_tokenizer(config), max_documents=None)
    limited = inspect_data(config, run_tokenizer(config), max_documents=3)
    assert limited["whole_pass"] and limited["read"] == whole["read"]
    assert (whole["read"]["records_read"], whole["read"]["too_short"], whole["read"]["blank"]) == (6, 2, 1)


def test_the_synthetic_corpus_says_what_min_length_dropped():
    config = load_config(None, ["data.num_documents=12", "data.min_length=490", "train.mode=ntp"])
    summary = inspect_data(config, run_tokenizer(config), max_documents=None)
    assert summary["read"]["generated"] == 12
    assert summary["read"]["too_short"] == 12 - summary["documents"] > 0


def test_length_counts_give_the_statistics_of_the_lengths_themselves():
    """A whole pass keeps a count per length (memory bounded by seq_len), not every length: same summary."""
    rng = random.Random(0)
    for size in (1, 2, 3, 10, 11, 1000):
        lengths = [rng.choice([5, 64, 64, 100, 512, 512, 512, rng.randint(2, 512)]) for _ in range(size)]
        counts = LengthCounts()
        for length in lengths:
            counts.add(length)
        ordered = sorted(lengths)
        assert len(counts) == size and counts.total() == sum(lengths)
        assert counts.median() == statistics.median(lengths)
        assert counts.percentile(0.9) == ordered[max(0, math.ceil(0.9 * size) - 1)]
        assert (min(counts.counts), max(counts.counts)) == (ordered[0], ordered[-1])
