import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from refine.data.documents import DocumentStream, iter_documents
from refine.data.sources import BadRowError, DataConfig
from refine.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()


def write_jsonl(path, rows, column="text"):
    path.write_text("".join(json.dumps({column: row} if isinstance(row, str) else row) + "\n" for row in rows))
    return path


def config(path, **overrides):
    return DataConfig(path=str(path), show_progress=False, **overrides)


def texts_of(documents):
    return [TOKENIZER.decode(document.token_ids) for document in documents]


# ---------------------------------------------------------------- bad input


def test_skip_bad_rows_skips_counts_and_logs_each(tmp_path, caplog):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(
        b'{"text": "one"}\n'
        b'{"text": "tw\xff\xfeo"}\n'  # undecodable bytes
        b"[1, 2]\n"  # not an object
        b'{"text": null}\n'  # not text
        b'{"text": "five"}\n'
    )
    caplog.set_level(logging.WARNING, logger="refine.data.sources")
    stream = DocumentStream(config(path, skip_bad_rows=True), TOKENIZER)
    assert texts_of(stream) == ["one", "five"]
    assert stream.stats.bad_rows == 3 and stream.stats.documents == 2 and stream.stats.records_read == 5
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "line 2: undecodable UTF-8" in logged
    assert "line 3: expected a JSON object, got list" in logged
    assert "line 4: column 'text' must hold text, got null" in logged


def test_non_text_parquet_value_is_a_bad_row(tmp_path):
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), tmp_path / "d.parquet")
    with pytest.raises(BadRowError, match=r"d.parquet, row 1: column 'text' must hold text, got null"):
        list(iter_documents(config(tmp_path / "d.parquet"), TOKENIZER))
    stream = DocumentStream(config(tmp_path / "d.parquet", skip_bad_rows=True), TOKENIZER)
    assert texts_of(stream) == ["fine", "also fine"] and stream.stats.bad_rows == 1


def test_lone_surrogate_is_a_bad_row_naming_the_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "ab\\ud800cd"}\n{"text": "three"}\n')
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: column 'text' holds a lone surrogate '\\ud800' "
                                          r"at character 2, not encodable as UTF-8"):
        list(iter_documents(config(path), TOKENIZER))
    stream = DocumentStream(config(path, skip_bad_rows=True), TOKENIZER)
    assert texts_of(stream) == ["one", "three"] and stream.stats.bad_rows == 1 and stream.stats.records_read == 3


def test_data_config_validation():
    with pytest.raises(ValidationError, match="min_length .* larger than max_length"):
        DataConfig(path="x", min_length=10, max_length=5)
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(path="x", txt_column="text")
    with pytest.raises(ValidationError, match="limit"):
        DataConfig(path="x", limit=0)


# ---------------------------------------------------------------- windows of long documents


def test_max_windows_needs_a_max_length_and_a_bound():
    with pytest.raises(ValidationError, match="max_windows=2 needs a max_length"):
        DataConfig(path="x", max_windows=2)
    with pytest.raises(ValidationError, match="max_windows"):
        DataConfig(path="x", max_length=8, max_windows=0)
    with pytest.raises(ValidationError, match="max_windows"):
        DataConfig(path="x", max_length=8, max_windows=(1 << 20) + 1)


def test_a_runs_data_format_reaches_the_reader(tmp_path):
    from itertools import islice

    from refine.config import load_config
    from refine.data.stream import document_stream

    # JSON lines under a .txt name: auto-detection would read the file as one plain-text document.
    path = write_jsonl(tmp_path / "rows.txt", ["a" * 40, "b" * 40])
    overrides = [f"data.source={path}", "data.seq_len=64", "data.min_length=8", "train.mode=ntp"]
    read = lambda config: [TOKENIZER.decode(ids) for _, ids, _ in islice(document_stream(config, TOKENIZER), 2)]  # noqa: E731
    assert read(load_config(None, overrides + ["data.format=jsonl"])) == ["a" * 40, "b" * 40]
    assert read(load_config(None, overrides))[0].startswith('{"text": "aaa')


# ---------------------------------------------------------------- review fixes


def test_min_length_below_two_is_refused_naming_the_value():
    for value in (0, 1):
        with pytest.raises(ValidationError, match=rf"min_length={value} keeps documents with nothing to train on"):
            DataConfig(path="x", min_length=value)
    assert DataConfig(path="x").min_length == 2
