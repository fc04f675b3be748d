import json
import logging
import re
from itertools import islice

import pytest

from refine.config import load_config
from refine.config_parsing import ConfigError
from refine.data.stream import (
    SOURCE_RECORD, DataPosition, _synthetic_texts, check_resumed_cursor, check_source, document_stream,
    synthetic_documents,
)
from refine.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
# With BOS, "x" * 50 is 51 tokens (kept), "y" * 100 is cut to seq_len, "short" and "tiny" fall under min_length.
TEXTS = ["x" * 50, "short", "y" * 100, "tiny", "z" * 45]


def run_config(tmp_path, texts, *extra):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    overrides = [f"data.source={path}", "data.seq_len=64", "data.min_length=40", "train.mode=ntp", *extra]
    return load_config(None, overrides)


EARLY = "the end of this pass reports the counts"
REPEATS = "every batch holds some of them more than once"


def pass_records(caplog):
    """The corpus reports (a pass over a file source, the synthetic corpus), not the early warnings nor the
    warning that batches repeat documents."""
    return [(record.levelno, record.getMessage()) for record in caplog.records
            if record.name == "refine.data.stream" and EARLY not in record.getMessage()
            and REPEATS not in record.getMessage()]


def repeat_warnings(caplog):
    return [record.getMessage() for record in caplog.records
            if record.name == "refine.data.stream" and REPEATS in record.getMessage()]


def test_a_batch_larger_than_a_pass_is_warned_of_once(tmp_path, caplog):
    """train.batch_size=8 over a source of 3 kept documents put each in every batch two or three times, silently."""
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    list(islice(document_stream(run_config(tmp_path, TEXTS, "train.batch_size=8"), TOKENIZER), 20))
    (message,) = repeat_warnings(caplog)
    assert message == (f"a pass over data.source='{tmp_path / 'docs.jsonl'}' holds 3 documents, fewer than "
                       f"train.batch_size=8: {REPEATS}")
    caplog.clear()
    list(islice(document_stream(run_config(tmp_path, TEXTS, "train.batch_size=3"), TOKENIZER), 20))
    assert repeat_warnings(caplog) == []
    config = load_config(None, ["data.num_documents=2", "train.batch_size=4", "data.seq_len=256",
                                "data.synthetic_tasks=[recall]"])
    next(document_stream(config, TOKENIZER))
    (message,) = repeat_warnings(caplog)
    assert message.startswith("the synthetic corpus (data.num_documents) holds 2 documents, fewer than "
                              "train.batch_size=4")


def early_warnings(caplog):
    return [record.getMessage() for record in caplog.records
            if record.name == "refine.data.stream" and EARLY in record.getMessage()]


def test_dropped_and_cut_documents_are_told_at_once_not_only_at_the_end_of_a_pass(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    stream = document_stream(run_config(tmp_path, ["a" * 50, "short", "b" * 60] + ["c" * 50] * 20), TOKENIZER)
    list(islice(stream, 2))  # a long way from the end of the pass
    assert pass_records(caplog) == []
    (message,) = early_warnings(caplog)
    assert "docs.jsonl" in message and "data.min_length=40" in message and "by record 3: 1 dropped as too short, 0 as blank, 0 cut" in message
    list(islice(stream, 30))  # the rest of the pass, and the next whole one: no second early warning
    assert len(early_warnings(caplog)) == 1 and len(pass_records(caplog)) == 1


def test_each_pass_logs_what_was_read_kept_dropped_and_truncated(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    stream = document_stream(run_config(tmp_path, TEXTS), TOKENIZER)
    first = list(islice(stream, 4))  # the fourth document starts the second pass
    assert [(doc_id, cursor) for doc_id, _, cursor in first] == [
        ("docs.jsonl:1", 1), ("docs.jsonl:3", 3), ("docs.jsonl:5", 5), ("docs.jsonl:1", 1)]
    counts = ("5 records read, 3 documents kept, 2 too short for data.min_length=40, 0 blank, 1 truncated to "
              "data.seq_len=64")
    ((level, message),) = pass_records(caplog)
    assert level == logging.WARNING
    assert "docs.jsonl" in message and "from record 0" in message and counts in message
    list(islice(stream, 3))  # the rest of the second pass and the start of the third
    # Later whole passes repeat the same counts: still logged, without a second warning.
    assert [level for level, _ in pass_records(caplog)] == [logging.WARNING, logging.INFO]
    assert counts in pass_records(caplog)[1][1]


def test_a_resumed_pass_logs_its_part_and_the_next_whole_pass_still_warns(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    stream = document_stream(run_config(tmp_path, TEXTS), TOKENIZER, start_cursor=2)
    list(islice(stream, 6))  # two documents left in the resumed pass, three in the next, one more after
    (resumed_level, resumed), (whole_level, whole) = pass_records(caplog)
    assert resumed_level == logging.WARNING and "from record 2: 3 records read, 2 documents kept" in resumed
    assert "1 too short for data.min_length=40, 0 blank, 1 truncated" in resumed
    assert whole_level == logging.WARNING and "from record 0: 5 records read, 3 documents kept" in whole


def test_blank_documents_are_dropped_counted_and_warned_about(tmp_path, caplog):
    """Texts of only whitespace or control characters (NUL included) are long enough in tokens, but nothing to
    learn from: dropped and counted as blank, and the cursor moves past them."""
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    texts = ["a" * 50, " \n\t " * 20, "\x00" * 60, "b" * 60, "\u3000\x85\x7f" * 20]
    stream = document_stream(run_config(tmp_path, texts), TOKENIZER)
    first = list(islice(stream, 3))
    assert [(doc_id, cursor) for doc_id, _, cursor in first] == [
        ("docs.jsonl:1", 1), ("docs.jsonl:4", 4), ("docs.jsonl:1", 1)]
    (warning,) = early_warnings(caplog)
    assert "by record 4: 0 dropped as too short, 2 as blank, 0 cut" in warning
    ((level, message),) = pass_records(caplog)
    assert level == logging.WARNING and "5 records read, 2 documents kept" in message and "3 blank" in message


def test_a_pass_that_keeps_every_document_whole_logs_at_info(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    stream = document_stream(run_config(tmp_path, ["a" * 50, "b" * 60]), TOKENIZER)
    list(islice(stream, 3))
    ((level, message),) = pass_records(caplog)
    assert level == logging.INFO
    assert "2 records read, 2 documents kept, 0 too short for data.min_length=40, 0 blank, 0 truncated" in message


def test_the_source_record_is_kept_and_a_damaged_one_is_recorded_anew(tmp_path):
    config = run_config(tmp_path, TEXTS)
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    assert check_source(config, out_dir, resumed=False) is None
    assert check_source(config, out_dir, resumed=True) is None  # same files: nothing to say
    assert not list(out_dir.glob(".*.tmp"))  # written whole, through a temporary file
    record = out_dir / SOURCE_RECORD
    record.write_text('{"files": [["docs.jsonl", 1')  # a write cut short
    message = check_source(config, out_dir, resumed=True)
    assert message.startswith(f"{record} could not be read (JSONDecodeError") and "recorded anew" in message
    assert check_source(config, out_dir, resumed=True) is None  # the record is whole again


def test_a_folders_source_record_leaves_out_the_files_it_does_not_read(tmp_path):
    folder = tmp_path / "corpus"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "part-0.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    config = load_config(None, [f"data.source={folder}", "data.seq_len=64", "data.min_length=40", "train.mode=ntp"])
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    assert check_source(config, out_dir, resumed=False) is None
    (folder / ".ipynb_checkpoints" / "part-0-checkpoint.jsonl").write_text('{"text": "a copy"}\n')
    (folder / ".notes.jsonl").write_text('{"text": "hidden"}\n')
    (folder / "README.md").write_text("where these documents come from")
    assert check_source(config, out_dir, resumed=True) is None  # what the run reads did not change
    (folder / "part-1.jsonl").write_text('{"text": "more"}\n')
    assert "1 files added, removed or resized, e.g. 'part-1.jsonl'" in check_source(config, out_dir, resumed=True)


def test_long_documents_train_as_windows_and_the_pass_says_how_many_were_split(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    # With BOS: 151 tokens -> 64, 64 and a last 23 (under min_length=40, dropped); 51 -> one; 300 -> 64 x 3, cut.
    config = run_config(tmp_path, ["y" * 150, "x" * 50, "z" * 299], "data.max_windows=3")
    stream = document_stream(config, TOKENIZER)
    first = list(islice(stream, 3))
    assert [(doc_id, len(ids), cursor) for doc_id, ids, cursor in first] == [
        ("docs.jsonl:1", 64, 1), ("docs.jsonl:1#1", 64, 3), ("docs.jsonl:2", 51, 6)]
    (warning,) = early_warnings(caplog)  # the dropped last window, at once
    assert "by record 1: 0 dropped as too short, 0 as blank, 0 cut, 1 last windows dropped as too short" in warning
    assert [(doc_id, cursor) for doc_id, _, cursor in islice(stream, 4)] == [
        ("docs.jsonl:3", 7), ("docs.jsonl:3#1", 8), ("docs.jsonl:3#2", 9), ("docs.jsonl:1", 1)]
    ((level, message),) = pass_records(caplog)
    assert level == logging.WARNING
    assert ("3 records read, 6 documents kept, 2 split into windows of data.seq_len (and 1 last windows shorter than "
            "data.min_length dropped), 0 too short for data.min_length=40, 0 blank, 1 truncated to data.max_windows=3 "
            "x data.seq_len=64 = 192 tokens") in message
    # A resume inside a record goes on with its next window.
    resumed = document_stream(config, TOKENIZER, start_cursor=7)
    assert [doc_id for doc_id, _, _ in islice(resumed, 3)] == ["docs.jsonl:3#1", "docs.jsonl:3#2", "docs.jsonl:1"]


def test_a_resume_with_other_windows_than_the_cursor_counts_is_refused_naming_both(tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    one = run_config(tmp_path, TEXTS)
    four = run_config(tmp_path, TEXTS, "data.max_windows=4")
    check_source(one, out_dir, resumed=False)  # a run recorded before windows existed reads the same way
    check_resumed_cursor(one, out_dir)
    with pytest.raises(ValueError, match=re.escape(
            f"this run's data cursor counts windows of data.max_windows=1 ({out_dir / SOURCE_RECORD}), this resume "
            f"has data.max_windows=4 x data.seq_len=64: resume with data.max_windows=1, or start a fresh run")):
        check_resumed_cursor(four, out_dir)
    check_source(four, out_dir, resumed=False)
    check_resumed_cursor(four, out_dir)
    longer = run_config(tmp_path, TEXTS, "data.max_windows=4", "data.seq_len=128")
    with pytest.raises(ValueError, match="resume with data.max_windows=4 x data.seq_len=64, or start a fresh run"):
        check_resumed_cursor(longer, out_dir)
    with pytest.raises(ValueError, match="this resume has data.max_windows=1: resume with data.max_windows=4 x "
                                         "data.seq_len=64"):
        check_resumed_cursor(one, out_dir)
    # With one window a document is cut at data.seq_len whatever it is: the cursor is the record index.
    check_source(one, out_dir, resumed=False)
    check_resumed_cursor(run_config(tmp_path, TEXTS, "data.seq_len=128"), out_dir)


def test_a_lost_source_record_lets_only_a_resume_without_windows_through(tmp_path):
    """A run directory without its record (a run from before windows existed, or a deleted file): the cursor
    could count windows or records, so windows would be a guess; without them the run goes on as before."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    check_resumed_cursor(run_config(tmp_path, TEXTS), out_dir)
    for damage in (None, "{not json"):
        if damage is not None:
            (out_dir / SOURCE_RECORD).write_text(damage)
        with pytest.raises(ValueError, match=re.escape(f"data.max_windows=3: {out_dir / SOURCE_RECORD} cannot be read")
                           + ".*resume with data.max_windows=1 and data.shuffle=false, or start a fresh run"):
            check_resumed_cursor(run_config(tmp_path, TEXTS, "data.max_windows=3"), out_dir)
        check_resumed_cursor(run_config(tmp_path, TEXTS), out_dir)


SHUFFLED = [f"document {i:02d} " + "x" * 40 for i in range(12)] + ["short"]


def test_a_shuffled_source_reads_every_pass_in_its_own_order_and_resumes_anywhere(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    config = run_config(tmp_path, SHUFFLED, "data.shuffle=true")
    items = list(islice(document_stream(config, TOKENIZER), 36))  # three passes of 12 documents
    passes = [[doc_id for doc_id, _, _ in items[k:k + 12]] for k in (0, 12, 24)]
    in_order = [f"docs.jsonl:{line}" for line in range(1, 13)]
    assert all(sorted(ids) == sorted(in_order) for ids in passes)
    assert len({tuple(ids) for ids in passes + [in_order]}) == 4
    # The cursor counts on across passes (13 records a pass, the short one included), so a resume draws its
    # pass's order again: resuming after any document goes on exactly.
    cursors = [cursor for _, _, cursor in items]
    assert cursors == sorted(cursors) and cursors[11] <= 13 < cursors[12] and cursors[23] <= 26 < cursors[24]
    for position in range(0, 35, 5):
        resumed = islice(document_stream(config, TOKENIZER, start_cursor=cursors[position]), 36 - position - 1)
        assert [item[:2] for item in resumed] == [item[:2] for item in items[position + 1:]]
    assert "pass 2 over data.source=" in "\n".join(message for _, message in pass_records(caplog))
    # Another train.seed draws other orders.
    other = run_config(tmp_path, SHUFFLED, "data.shuffle=true", "train.seed=1")
    assert [doc_id for doc_id, _, _ in islice(document_stream(other, TOKENIZER), 12)] != passes[0]


def test_a_shuffled_source_that_grows_during_the_run_stops_it_at_the_next_pass(tmp_path):
    """Its cursor counts passes of the source's records: a pass of more would count into the next pass's."""
    config = run_config(tmp_path, SHUFFLED, "data.shuffle=true")
    stream = document_stream(config, TOKENIZER)
    list(islice(stream, 12))  # the first pass
    with (tmp_path / "docs.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "one more document " * 4}) + "\n")
    with pytest.raises(ValueError, match=r"docs.jsonl' changed during the run: a shuffled run's data cursor counts "
                                         r"passes of 13 records, and it holds 14 now; resume with --resume"):
        next(stream)


def test_a_resume_with_another_order_than_the_cursor_counts_in_is_refused_naming_both(tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    shuffled = run_config(tmp_path, TEXTS, "data.shuffle=true")
    check_source(shuffled, out_dir, resumed=False)
    check_resumed_cursor(shuffled, out_dir)
    record = re.escape(f"({out_dir / SOURCE_RECORD})")
    with pytest.raises(ValueError, match=f"counts records in the order of data.shuffle=true with train.seed=0 {record}, "
                                         "this resume has data.shuffle=false: resume with data.shuffle=true with "
                                         "train.seed=0, or start a fresh run"):
        check_resumed_cursor(run_config(tmp_path, TEXTS), out_dir)
    with pytest.raises(ValueError, match="this resume has data.shuffle=true with train.seed=5"):
        check_resumed_cursor(run_config(tmp_path, TEXTS, "data.shuffle=true", "train.seed=5"), out_dir)
    check_source(run_config(tmp_path, TEXTS), out_dir, resumed=False)
    with pytest.raises(ValueError, match="counts records in the order of data.shuffle=false"):
        check_resumed_cursor(shuffled, out_dir)
    (out_dir / SOURCE_RECORD).unlink()  # lost: the order the cursor counts in is unknown
    with pytest.raises(ValueError, match="data.shuffle=true: .* cannot be read"):
        check_resumed_cursor(shuffled, out_dir)


def test_shuffle_is_refused_for_the_synthetic_corpus():
    with pytest.raises(ConfigError, match=r"data.shuffle=true orders the records of data.source when it is a file source"):
        load_config(None, ["data.shuffle=true"])


def test_max_windows_is_refused_for_the_synthetic_corpus():
    with pytest.raises(ConfigError, match=r"data.max_windows=2 splits long documents of a file source"):
        load_config(None, ["data.max_windows=2"])


# ---------------------------------------------------------------- the synthetic corpus


def synthetic_config(*overrides):
    return load_config(None, ["train.mode=ntp", "data.min_length=16", *overrides])


def test_the_synthetic_corpus_counts_and_logs_what_min_length_drops(caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    config = synthetic_config("data.synthetic_tasks=[recall,niah,mqar]", "data.num_documents=30", "data.seq_len=512",
                              "data.min_length=500")
    docs = synthetic_documents(config, TOKENIZER)
    assert 0 < len(docs) < 30 and all(len(ids) >= 500 for _, ids in docs)
    ((level, message),) = pass_records(caplog)
    assert level == logging.WARNING
    assert f"30 documents generated, {len(docs)} kept, {30 - len(docs)} too short for data.min_length=500" in message
    caplog.clear()
    synthetic_documents(synthetic_config("data.num_documents=4"), TOKENIZER)
    ((level, message),) = pass_records(caplog)
    assert level == logging.INFO and "4 documents generated, 4 kept, 0 too short" in message


@pytest.mark.parametrize("kind, seq_len", [("niah", 300), ("mqar", 64), ("recall", 100)])
def test_a_seq_len_too_short_for_a_synthetic_task_names_the_settings_and_the_least_that_works(kind, seq_len):
    overrides = [f"data.synthetic_tasks=[{kind}]", "data.num_documents=12"]
    with pytest.raises(ValueError, match=rf"data\.seq_len={seq_len} is too short for the {kind} documents of "
                                         rf"data\.synthetic_tasks=\['{kind}'\]") as caught:
        synthetic_documents(synthetic_config(*overrides, f"data.seq_len={seq_len}"), TOKENIZER)
    least = int(re.search(r"need data\.seq_len >= (\d+)", str(caught.value)).group(1))
    # The least length named is exact: every document fits it, one token less fails.
    docs = synthetic_documents(synthetic_config(*overrides, f"data.seq_len={least}"), TOKENIZER)
    assert len(docs) == 12 and max(len(ids) for _, ids in docs) <= least
    with pytest.raises(ValueError, match=rf"need data\.seq_len >= {least}\b"):
        synthetic_documents(synthetic_config(*overrides, f"data.seq_len={least - 1}"), TOKENIZER)


def test_a_synthetic_seq_len_too_short_fails_before_the_service_starts_anything(tmp_path):
    from services.orchestrator import run

    config = load_config(None, [f"train.out_dir={tmp_path / 'run'}", "data.synthetic_tasks=[niah]", "data.seq_len=300",
                                f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    # An unreachable Redis: a check made only once the service started would fail on it instead.
    with pytest.raises(ConfigError, match=r"data\.seq_len=300 is too short for the niah documents"):
        run(config, progress=False, redis_url="redis://127.0.0.1:1/0")
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("seq_len", [200, 512])
def test_synthetic_documents_keep_every_token_with_their_bos(seq_len, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    config = synthetic_config("data.synthetic_tasks=[recall,mqar]", "data.num_documents=512", f"data.seq_len={seq_len}")
    texts = dict(text for kind in ("recall", "mqar") for text in _synthetic_texts(kind, config, TOKENIZER, 256))
    docs = synthetic_documents(config, TOKENIZER)
    # Each document is BOS + its whole text: a text that overflowed seq_len would have lost its end.
    assert all(ids == [TOKENIZER.bos_id, *TOKENIZER.encode(texts[doc_id])] for doc_id, ids in docs)
    assert max(len(ids) for _, ids in docs) <= seq_len
    assert "0 truncated" in pass_records(caplog)[0][1]


def test_the_synthetic_corpus_has_exactly_num_documents_in_mixed_order():
    docs = synthetic_documents(synthetic_config("data.synthetic_tasks=[recall,niah,mqar]", "data.num_documents=7"),
                               TOKENIZER)
    assert [doc_id for doc_id, _ in docs] == [
        "recall_0_0", "niah:niah_single_0_0", "mqar:mqar_0_0", "recall_0_1", "niah:niah_single_0_1", "mqar:mqar_0_1",
        "recall_0_2"]
    # Shares that divide evenly keep the order runs were started with.
    even = synthetic_documents(synthetic_config("data.synthetic_tasks=[recall,mqar]", "data.num_documents=4"),
                               TOKENIZER)
    assert [doc_id for doc_id, _ in even] == ["recall_0_0", "mqar:mqar_0_0", "recall_0_1", "mqar:mqar_0_1"]
    with pytest.raises(ConfigError, match=r"data\.num_documents=2 is fewer than the 3 data\.synthetic_tasks"):
        synthetic_config("data.synthetic_tasks=[recall,niah,mqar]", "data.num_documents=2")


def test_a_resumed_synthetic_run_says_when_min_length_changed_the_corpus(tmp_path):
    before = synthetic_config("data.min_length=16")
    assert check_source(before, tmp_path, resumed=False) is None
    assert check_source(before, tmp_path, resumed=True) is None
    message = check_source(synthetic_config("data.min_length=200"), tmp_path, resumed=True)
    assert message is not None and "'min_length': 16" in message and "'min_length': 200" in message


def test_a_pass_that_skipped_bad_rows_ends_with_a_warning(tmp_path, caplog):
    """Skipped rows are trained on by nobody: the pass's summary is a warning even when no document was cut."""
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "x" * 50}) + "\n{not json\n" + json.dumps({"text": "z" * 45}) + "\n")
    config = load_config(None, [f"data.source={path}", "data.seq_len=64", "data.min_length=40", "train.mode=ntp",
                                "data.skip_bad_rows=true"])
    list(islice(document_stream(config, TOKENIZER), 3))  # the whole first pass and the next one's start
    ((level, message),) = pass_records(caplog)
    assert level == logging.WARNING and "1 bad rows skipped" in message


def test_data_position_counts_passes() -> None:
    position = DataPosition(epoch=0, cursor=-1)
    assert [position.advance(cursor) for cursor in (2, 4, 0, 2, 1, 1)] == [0, 0, 1, 1, 2, 3]
    resumed = DataPosition(epoch=1, cursor=0)  # a checkpoint taken after the batch that ended pass 0
    assert (resumed.advance(2), resumed.cursor) == (1, 2)
