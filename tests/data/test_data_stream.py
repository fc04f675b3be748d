import json
import logging
from itertools import islice

from refine.config import load_config
from refine.data.stream import SOURCE_RECORD, check_source, document_stream
from refine.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
# With BOS, "x" * 50 is 51 tokens (kept), "y" * 100 is cut to seq_len, "short" and "tiny" fall under min_length.
TEXTS = ["x" * 50, "short", "y" * 100, "tiny", "z" * 45]


def run_config(tmp_path, texts):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    overrides = [f"data.source={path}", "data.seq_len=64", "data.min_length=40", "train.mode=ntp"]
    return load_config(None, overrides)


def pass_records(caplog):
    return [(record.levelno, record.getMessage()) for record in caplog.records if record.name == "refine.data.stream"]


def test_each_pass_logs_what_was_read_kept_dropped_and_truncated(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    stream = document_stream(run_config(tmp_path, TEXTS), TOKENIZER)
    first = list(islice(stream, 4))  # the fourth document starts the second pass
    assert [(doc_id, cursor) for doc_id, _, cursor in first] == [
        ("docs.jsonl:1", 1), ("docs.jsonl:3", 3), ("docs.jsonl:5", 5), ("docs.jsonl:1", 1)]
    counts = "5 records read, 3 documents kept, 2 too short for data.min_length=40, 1 truncated to data.seq_len=64"
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
    assert "1 too short for data.min_length=40, 1 truncated" in resumed
    assert whole_level == logging.WARNING and "from record 0: 5 records read, 3 documents kept" in whole


def test_a_pass_that_keeps_every_document_whole_logs_at_info(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    stream = document_stream(run_config(tmp_path, ["a" * 50, "b" * 60]), TOKENIZER)
    list(islice(stream, 3))
    ((level, message),) = pass_records(caplog)
    assert level == logging.INFO
    assert "2 records read, 2 documents kept, 0 too short for data.min_length=40, 0 truncated" in message


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
