import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from refine.data.sources import (
    BadRowError,
    BadRowPolicy,
    DataConfig,
    DataSourceError,
    DocumentStream,
    EmptySourceError,
    MissingColumnError,
    RowSource,
    detect_format,
    iter_documents,
    random_order,
)
from refine.data.stream import pass_shuffle_seed
from refine.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
BOS, EOS = TOKENIZER.bos_id, TOKENIZER.eos_id


def write_jsonl(path, rows, column="text"):
    path.write_text("".join(json.dumps({column: row} if isinstance(row, str) else row) + "\n" for row in rows))
    return path


def config(path, **overrides):
    return DataConfig(path=str(path), show_progress=False, **overrides)


def texts_of(documents):
    return [TOKENIZER.decode(document.token_ids) for document in documents]


# ---------------------------------------------------------------- formats


def test_jsonl_documents_get_bos_and_keep_source_order(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["first doc", "second", "third one"])
    documents = list(iter_documents(config(path), TOKENIZER))
    assert texts_of(documents) == ["first doc", "second", "third one"]
    assert all(document.token_ids[0] == BOS for document in documents)
    assert [d.index for d in documents] == [0, 1, 2]
    assert [d.doc_id for d in documents] == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:3"]


def test_min_length_filters_and_max_length_truncates_with_counts(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["abc", "a", "abcdefghij", ""])
    stream = DocumentStream(config(path, min_length=3, max_length=6, add_eos=True), TOKENIZER)
    documents = list(stream)
    # "abc" -> BOS a b c EOS (5); "a" -> BOS a EOS (3 >= 3, kept); long one cut to 6 without EOS; "" -> BOS EOS (2)
    assert [d.token_ids for d in documents] == [
        [BOS, *b"abc", EOS],
        [BOS, *b"a", EOS],
        [BOS, *b"abcde"],
    ]
    assert [d.truncated for d in documents] == [False, False, True]
    assert stream.stats.too_short == 1 and stream.stats.truncated == 1 and stream.stats.documents == 3
    assert stream.stats.records_read == 4 and stream.stats.tokens == 5 + 3 + 6


def test_parquet_folder_with_row_groups_and_resume(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    all_texts = [f"document number {i}" for i in range(25)]
    pq.write_table(pa.table({"body": all_texts[:10], "n": list(range(10))}), folder / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"body": all_texts[10:], "n": list(range(10, 25))}), folder / "b.parquet", row_group_size=4)
    assert detect_format(folder) == "parquet"
    cfg = config(folder, text_column="body", tokenize_batch_size=4)
    full = list(iter_documents(cfg, TOKENIZER))
    assert texts_of(full) == all_texts
    assert full[12].doc_id == "b.parquet:2" and full[12].index == 12

    stream = DocumentStream(cfg, TOKENIZER)
    head = []
    for document in stream:
        head.append(document)
        if len(head) == 11:
            break
    assert stream.cursor == 11
    tail = list(DocumentStream(cfg, TOKENIZER).iter_from(stream.cursor))
    assert [d.token_ids for d in head + tail] == [d.token_ids for d in full]
    assert [d.index for d in tail] == list(range(11, 25))


def test_resume_skips_filtered_records_exactly_once(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["long enough", "x", "y", "also long", "z", "long again"])
    cfg = config(path, min_length=5, tokenize_batch_size=2)
    stream = DocumentStream(cfg, TOKENIZER)
    iterator = iter(stream)
    first = next(iterator)
    second = next(iterator)
    assert texts_of([first, second]) == ["long enough", "also long"]
    assert stream.cursor == second.index + 1 == 4
    rest = list(DocumentStream(cfg, TOKENIZER).iter_from(stream.cursor))
    assert texts_of(rest) == ["long again"]


def test_text_folder_one_document_per_file(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bravo")
    (tmp_path / "corpus" / "a.txt").write_text("alpha\nwith two lines")
    (tmp_path / "corpus" / "sub" / "c.txt").write_text("charlie")
    documents = list(iter_documents(config(tmp_path / "corpus"), TOKENIZER))
    assert texts_of(documents) == ["alpha\nwith two lines", "bravo", "charlie"]
    assert documents[2].doc_id == "sub/c.txt"


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package reads save_to_disk folders")
    datasets.Dataset.from_dict({"content": ["one", "two", "three"]}).save_to_disk(str(tmp_path / "single"))
    cfg = config(tmp_path / "single", text_column="content")
    assert detect_format(tmp_path / "single") == "hf"
    assert texts_of(iter_documents(cfg, TOKENIZER)) == ["one", "two", "three"]
    assert texts_of(DocumentStream(cfg, TOKENIZER).iter_from(2)) == ["three"]

    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
            "test": datasets.Dataset.from_dict({"text": ["e1"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert texts_of(iter_documents(config(tmp_path / "dict"), TOKENIZER)) == ["t1", "t2"]
    assert texts_of(iter_documents(config(tmp_path / "dict", split="test"), TOKENIZER)) == ["e1"]
    with pytest.raises(DataSourceError, match="split 'dev' not in .*splits present: \\['train', 'test'\\]"):
        list(iter_documents(config(tmp_path / "dict", split="dev"), TOKENIZER))
    with pytest.raises(MissingColumnError, match="column 'text' not found .*columns present: \\['content'\\]"):
        list(iter_documents(config(tmp_path / "single"), TOKENIZER))


@pytest.mark.parametrize("files", [
    {"dataset_dict.json": "{}"},
    {"dataset_dict.json": "garbage"},
    {"state.json": "{}", "dataset_info.json": "{}"},
], ids=["dict-without-splits", "dict-not-json", "state-without-files"])
def test_a_damaged_save_to_disk_folder_names_the_folder(tmp_path, files):
    """datasets.load_from_disk raised a bare KeyError: 'splits' / '_data_files', or a JSON error naming no file."""
    pytest.importorskip("datasets", reason="the `datasets` package reads save_to_disk folders")
    (tmp_path / "hf").mkdir()
    for name, text in files.items():
        (tmp_path / "hf" / name).write_text(text)
    with pytest.raises(DataSourceError, match=rf"^dataset '{tmp_path / 'hf'}' cannot be read as a save_to_disk "
                                              r"dataset: \w+Error"):
        list(iter_documents(config(tmp_path / "hf"), TOKENIZER))


def test_limit_reads_only_the_first_records(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a1", "a2", "a3", "a4"])
    stream = DocumentStream(config(path, limit=2), TOKENIZER)
    assert texts_of(stream) == ["a1", "a2"]
    assert stream.stats.records_read == 2
    with open(path, "a") as handle:
        handle.write("{broken\n")  # past the limit: never parsed
    assert texts_of(iter_documents(config(path, limit=4), TOKENIZER)) == ["a1", "a2", "a3", "a4"]
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "d.parquet", row_group_size=2)
    assert texts_of(iter_documents(config(tmp_path / "d.parquet", limit=2), TOKENIZER)) == ["p1", "p2"]


# ---------------------------------------------------------------- bad input


def test_empty_sources_raise(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(EmptySourceError, match="holds no records"):
        list(iter_documents(config(tmp_path / "empty.jsonl"), TOKENIZER))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EmptySourceError, match="holds no"):
        list(iter_documents(config(tmp_path / "nothing"), TOKENIZER))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "zero.parquet")
    with pytest.raises(EmptySourceError, match="holds no records"):
        list(iter_documents(config(tmp_path / "zero.parquet"), TOKENIZER))


def test_everything_filtered_raises_with_counts(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a", "b"])
    with pytest.raises(EmptySourceError, match="no document .* passed the filters .*'too_short': 2"):
        list(iter_documents(config(path, min_length=10), TOKENIZER))


def test_missing_parquet_column_names_column_and_columns_present(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "meta": [1]}), tmp_path / "d.parquet")
    with pytest.raises(MissingColumnError) as caught:
        list(iter_documents(config(tmp_path / "d.parquet"), TOKENIZER))
    assert caught.value.column == "text" and caught.value.present == ["body", "meta"]
    assert "d.parquet" in str(caught.value)


def test_jsonl_row_without_column_is_a_bad_row_naming_keys(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["good", {"body": "wrong key"}])
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: column 'text' missing; keys present: \['body'\]"):
        list(iter_documents(config(path), TOKENIZER))


def test_malformed_jsonl_row_raises_with_line_after_yielding_earlier_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    received = []
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: malformed JSON"):
        for document in iter_documents(config(path), TOKENIZER):
            received.append(document)
    assert texts_of(received) == ["one"]


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


def test_undecodable_bytes_raise_without_skip(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xc3\x28"}\n')
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: undecodable UTF-8 at byte 10"):
        list(iter_documents(config(path), TOKENIZER))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(BadRowError, match=r"bad.txt: undecodable UTF-8 at byte 3"):
        list(iter_documents(config(tmp_path / "txt"), TOKENIZER))


def test_non_text_parquet_value_is_a_bad_row(tmp_path):
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), tmp_path / "d.parquet")
    with pytest.raises(BadRowError, match=r"d.parquet, row 1: column 'text' must hold text, got null"):
        list(iter_documents(config(tmp_path / "d.parquet"), TOKENIZER))
    stream = DocumentStream(config(tmp_path / "d.parquet", skip_bad_rows=True), TOKENIZER)
    assert texts_of(stream) == ["fine", "also fine"] and stream.stats.bad_rows == 1


def test_json_error_column_is_on_the_row_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "x"\n')
    # The row ends after 12 characters: the missing brace is at column 13 of line 2, not column 1 of line 3.
    with pytest.raises(BadRowError, match=r"line 2: malformed JSON \(Expecting ',' delimiter: column 13\)"):
        list(iter_documents(config(path), TOKENIZER))
    path.write_text('{"text": "one"}\n{"text": "cut\n')  # json's own message ends in "at": not "at at column"
    with pytest.raises(BadRowError, match=r"line 2: malformed JSON \(Unterminated string starting at: column 10\) \("):
        list(iter_documents(config(path), TOKENIZER))


def test_json_python_cannot_hold_is_a_bad_row(tmp_path, caplog):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        '{"text": "one"}\n'
        '{"text": "two", "n": ' + "9" * 5000 + "}\n"  # past the int-string conversion limit
        '{"text": "three", "m": ' + "[" * 100_000 + "]" * 100_000 + "}\n"  # past the recursion limit
        '{"text": "four"}\n'
    )
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: unreadable JSON \(Exceeds the limit"):
        list(iter_documents(config(path), TOKENIZER))
    caplog.set_level(logging.WARNING, logger="refine.data.sources")
    stream = DocumentStream(config(path, skip_bad_rows=True), TOKENIZER)
    assert texts_of(stream) == ["one", "four"]
    assert stream.stats.bad_rows == 2 and stream.stats.records_read == 4
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "line 2: unreadable JSON (Exceeds the limit" in logged
    assert "line 3: unreadable JSON (maximum recursion depth exceeded" in logged


def test_lone_surrogate_is_a_bad_row_naming_the_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "ab\\ud800cd"}\n{"text": "three"}\n')
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: column 'text' holds a lone surrogate '\\ud800' "
                                          r"at character 2, not encodable as UTF-8"):
        list(iter_documents(config(path), TOKENIZER))
    stream = DocumentStream(config(path, skip_bad_rows=True), TOKENIZER)
    assert texts_of(stream) == ["one", "three"] and stream.stats.bad_rows == 1 and stream.stats.records_read == 3


def test_a_file_that_is_not_parquet_names_the_file(tmp_path):
    pq.write_table(pa.table({"text": ["fine"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DataSourceError, match=r"parquet file '.*b.parquet' cannot be opened \(Parquet magic bytes"):
        list(iter_documents(config(tmp_path), TOKENIZER))


def test_a_damaged_parquet_row_group_names_the_file_and_group_after_the_good_ones(tmp_path):
    path = tmp_path / "d.parquet"
    texts = [f"document {i} " * 20 for i in range(6)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=3, compression="snappy")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    middle, end = start + chunk.total_compressed_size // 2, start + chunk.total_compressed_size
    raw[middle:end] = bytes(end - middle)  # zero the second half of row group 1's pages; the footer stays intact
    path.write_bytes(raw)
    received = []
    with pytest.raises(DataSourceError, match=r"parquet file '.*d.parquet', row group 1 \(rows 3-5\): cannot be read"):
        for document in iter_documents(config(path, tokenize_batch_size=1), TOKENIZER):
            received.append(document)
    assert texts_of(received) == texts[:3]


def test_a_parquet_value_python_cannot_hold_names_the_file_and_group(tmp_path):
    """A date32 past year 9999 (an int32 column cast) raised a raw OverflowError from pyarrow's conversion, even
    with skip_bad_rows, on both the in-order and the shuffled reading."""
    path = tmp_path / "date.parquet"
    pq.write_table(pa.table({"text": pa.array([2**31 - 1], pa.int32()).cast(pa.date32())}), path)
    error = r"parquet file '.*date\.parquet', row group 0 \(rows 0-0\): cannot be read \(OverflowError: "
    with pytest.raises(DataSourceError, match=error):
        list(iter_documents(config(path, skip_bad_rows=True), TOKENIZER))
    with pytest.raises(DataSourceError, match=error):
        list(RowSource(path, columns=["text"]).shuffled_rows(seed=7))


def test_format_detection_errors(tmp_path):
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(DataSourceError, match="cannot tell the format .*'.csv'"):
        detect_format(tmp_path / "data.csv")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("x")
    write_jsonl(tmp_path / "mixed" / "b.jsonl", ["y"])
    with pytest.raises(DataSourceError, match=r"mixes formats \['jsonl', 'text'\]"):
        detect_format(tmp_path / "mixed")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(config(tmp_path / "missing.jsonl"), TOKENIZER))
    # an explicit format overrides the extension
    write_jsonl(tmp_path / "rows.data", ["z"])
    assert texts_of(iter_documents(config(tmp_path / "rows.data", format="jsonl"), TOKENIZER)) == ["z"]


def test_data_config_validation():
    with pytest.raises(ValidationError, match="min_length .* larger than max_length"):
        DataConfig(path="x", min_length=10, max_length=5)
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(path="x", txt_column="text")
    with pytest.raises(ValidationError, match="limit"):
        DataConfig(path="x", limit=0)


def test_a_leading_byte_order_mark_is_not_data(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n" + json.dumps({"text": "second"}).encode())
    assert texts_of(iter_documents(config(jsonl), TOKENIZER)) == ["first", "second"]  # line 1 was a bad row
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(b"\xef\xbb\xbfalpha")
    assert texts_of(iter_documents(config(tmp_path / "corpus"), TOKENIZER)) == ["alpha"]  # not "\ufeffalpha"


def test_a_huge_document_is_tokenized_only_as_far_as_it_is_kept(tmp_path, monkeypatch):
    from test_tokenizer import write_bpe_tokenizer

    from refine.tokenizer import load_tokenizer

    write_bpe_tokenizer(tmp_path / "tok")
    words = " ".join(f"word{i % 97} and some more text" for i in range(40_000))  # about 1.2 million characters
    # Text without ASCII whitespace: Japanese whose paragraphs open with an ideographic space, and one long word.
    japanese = "".join(f"\u3000第{i}段落の文章です。次の文も続きます。" for i in range(5_000))
    # Whitespace only at its start: a cut there would keep too few characters, and the whole text be tokenized.
    titled = "title " + "漢字" * 2_500
    texts = [words, "short text " * 20, "x" * 50_000, japanese, titled]
    source = write_jsonl(tmp_path / "huge.jsonl", texts)
    for tokenizer in (TOKENIZER, load_tokenizer(tmp_path / "tok")):
        seen: list[int] = []
        encode_batch = tokenizer.encode_batch
        # monkeypatch restores the shared TOKENIZER for later tests (the lambda would call the BPE tokenizer's).
        monkeypatch.setattr(tokenizer, "encode_batch",
                            lambda texts, seen=seen, encode_batch=encode_batch: seen.extend(map(len, texts))
                            or encode_batch(texts))
        stream = DocumentStream(config(source, max_length=64, min_length=4), tokenizer)
        documents = list(stream)
        # No long text was tokenized whole: one with whitespace is cut at the last (an ideographic space too),
        # one without at the limit; the tokens kept are those of the whole text.
        limit = 64 * 32
        if tokenizer is TOKENIZER:  # bytes: any cut is exact
            assert seen == [limit, len(texts[1]), limit, limit, limit]
        else:  # the last whitespace before the limit, in the limit's second half, else the limit
            assert seen == [texts[0].rfind(" ", 0, limit), len(texts[1]), limit, texts[3].rfind("\u3000", 0, limit),
                            limit]
            assert texts[3][limit] == "\u3000" and seen[3] < limit  # not the whitespace at the limit itself
        assert seen[3] >= limit // 2 and len(texts[3]) > 10 * seen[3]
        for document, text in zip(documents, texts):
            whole = [tokenizer.bos_id] + tokenizer.encode(text)
            assert document.token_ids == (whole[:64] if len(whole) > 64 else whole + [tokenizer.eos_id])
        assert stream.stats.truncated == 5 and len(documents) == 5


# ---------------------------------------------------------------- windows of long documents


def test_a_long_document_becomes_consecutive_windows_and_past_max_windows_is_cut(tmp_path):
    # With BOS: 26 tokens -> 10 + 10 + 6; 3 tokens (too short); 41 -> three windows of 10, the rest cut;
    # 10 tokens -> one whole window; 23 -> 10 + 10 + a last window of 3, under min_length=4.
    path = write_jsonl(tmp_path / "docs.jsonl", ["a" * 25, "bb", "c" * 40, "d" * 9, "e" * 22])
    stream = DocumentStream(config(path, min_length=4, max_length=10, max_windows=3), TOKENIZER)
    documents = list(stream)
    assert [d.doc_id for d in documents] == [
        "docs.jsonl:1", "docs.jsonl:1#1", "docs.jsonl:1#2", "docs.jsonl:3", "docs.jsonl:3#1", "docs.jsonl:3#2",
        "docs.jsonl:4", "docs.jsonl:5", "docs.jsonl:5#1"]
    # The windows are the record's tokens in order, BOS only at its start; nothing between them is lost.
    assert documents[0].token_ids + documents[1].token_ids + documents[2].token_ids == [BOS, *b"a" * 25]
    assert documents[3].token_ids + documents[4].token_ids + documents[5].token_ids == [BOS, *b"c" * 29]
    assert documents[7].token_ids + documents[8].token_ids == [BOS, *b"e" * 19]
    assert all(len(d.token_ids) <= 10 for d in documents)
    assert [d.window for d in documents] == [0, 1, 2, 0, 1, 2, 0, 0, 1]
    assert [d.truncated for d in documents] == [False, False, False, False, False, True, False, False, False]
    assert stream.stats.model_dump() == {
        "records_read": 5, "documents": 9, "tokens": 26 + 30 + 10 + 20, "too_short": 1, "blank": 0, "truncated": 1,
        "split": 3, "short_tails": 1, "bad_rows": 0}


def test_windows_get_eos_only_where_the_record_ends_inside_them(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a" * 12, "b" * 9, "c" * 40])
    documents = list(iter_documents(config(path, min_length=2, max_length=5, max_windows=3, add_eos=True), TOKENIZER))
    # 13 tokens + EOS -> 5, 5, 4; 10 tokens fill two windows (no room for EOS); 41 are cut to 15, no EOS.
    assert [d.token_ids for d in documents] == [
        [BOS, *b"aaaa"], [*b"aaaaa"], [*b"aaa", EOS], [BOS, *b"bbbb"], [*b"bbbbb"],
        [BOS, *b"cccc"], [*b"ccccc"], [*b"ccccc"]]


@pytest.mark.parametrize("max_windows", [1, 2, 4])
def test_a_stream_resumes_exactly_after_every_document_even_inside_a_record(tmp_path, max_windows):
    rows = ["a" * 33, "", "b" * 7, "c" * 70, "   ", "d" * 15, "e" * 8]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    settings = config(path, min_length=6, max_length=8, max_windows=max_windows)
    documents = list(iter_documents(settings, TOKENIZER))
    whole = [(d.doc_id, d.token_ids) for d in documents]
    assert len(whole) == {1: 5, 2: 8, 4: 12}[max_windows]
    for position, document in enumerate(documents):
        rest = [(d.doc_id, d.token_ids) for d in iter_documents(settings, TOKENIZER, cursor=document.next_cursor)]
        assert rest == whole[position + 1:]
    # The cursor counts windows inside records: with one window it is the record index, as it always was.
    cursors = [d.next_cursor for d in documents]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    if max_windows == 1:
        assert cursors == [d.index + 1 for d in documents]


def test_a_huge_document_is_tokenized_only_as_far_as_its_windows_keep(tmp_path, monkeypatch):
    text = " ".join(f"word{i}" for i in range(200_000))  # about 1.3 million characters
    source = write_jsonl(tmp_path / "huge.jsonl", [text])
    seen: list[int] = []
    encode_batch = TOKENIZER.encode_batch
    monkeypatch.setattr(TOKENIZER, "encode_batch", lambda texts: seen.extend(map(len, texts)) or encode_batch(texts))
    documents = list(iter_documents(config(source, max_length=64, max_windows=4), TOKENIZER))
    assert seen == [64 * 4 * 32]
    assert [token for d in documents for token in d.token_ids] == [BOS, *text.encode()[:64 * 4 - 1]]


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


def test_an_empty_text_is_too_short_not_a_one_token_document(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["", "hello"])
    stream = DocumentStream(config(path), TOKENIZER)
    assert texts_of(stream) == ["hello"] and stream.stats.too_short == 1


def test_a_row_without_text_hands_out_the_documents_read_before_it_like_a_malformed_row(tmp_path):
    for name, bad_line in [("malformed", b'{"text": oops}'), ("null", b'{"text": null}'), ("number", b'{"text": 5}')]:
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b'{"text": "aa"}\n{"text": "bb"}\n' + bad_line + b'\n{"text": "dd"}\n')
        stream = DocumentStream(config(path), TOKENIZER)  # tokenize_batch_size 64: both wait in one batch
        received = []
        with pytest.raises(BadRowError, match=rf"{name}.jsonl, line 3"):
            for document in stream:
                received.append(document)
        assert texts_of(received) == ["aa", "bb"], name
        assert stream.cursor == 2, name  # a restart reads the bad row again, and fails on it again


def test_a_parquet_folder_keeps_open_only_the_shard_it_reads(tmp_path):
    descriptors = Path("/proc/self/fd")
    if not descriptors.is_dir():
        pytest.skip("counts open files through /proc")
    for shard in range(40):
        pq.write_table(pa.table({"text": [f"shard {shard} doc {row}" for row in range(2)]}),
                       tmp_path / f"part-{shard:03d}.parquet")
    before = len(list(descriptors.iterdir()))
    documents = iter_documents(config(tmp_path), TOKENIZER)
    first = next(documents)
    assert first.doc_id == "part-000.parquet:0"
    assert len(list(descriptors.iterdir())) - before <= 2  # one shard (and pyarrow's own), not forty
    assert 1 + sum(1 for _ in documents) == 80
    assert DocumentStream(config(tmp_path), TOKENIZER).iter_from(75).__next__().doc_id == "part-037.parquet:1"


def test_a_fifo_or_a_device_is_refused_as_neither_file_nor_folder(tmp_path):
    fifo, device = tmp_path / "pipe.jsonl", tmp_path / "zero.jsonl"
    os.mkfifo(fifo)
    device.symlink_to("/dev/zero")
    for path in (fifo, device):
        with pytest.raises(DataSourceError, match=f"data path '{path}' is neither a regular file nor a folder"):
            detect_format(path)


def test_folder_sources_read_any_case_skip_hidden_files_and_refuse_compressed_ones(tmp_path):
    folder = tmp_path / "corpus"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", ["from a"])
    write_jsonl(folder / "B.JSONL", ["from B"])
    write_jsonl(folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl", ["a copy"])
    write_jsonl(folder / ".partial.jsonl", ["half written"])
    assert detect_format(folder) == "jsonl"
    assert [d.doc_id for d in iter_documents(config(folder), TOKENIZER)] == ["B.JSONL:1", "a.jsonl:1"]
    (folder / "c.jsonl.GZ").write_bytes(b"\x1f\x8b compressed")
    with pytest.raises(DataSourceError, match=r"holds '.*c\.jsonl\.GZ', a compressed file, which cannot be read"):
        list(iter_documents(config(folder), TOKENIZER))
    with pytest.raises(DataSourceError, match=r"c\.jsonl\.GZ' is a compressed file"):
        detect_format(folder / "c.jsonl.GZ")


def test_a_link_to_a_data_file_that_is_not_there_is_named(tmp_path):
    """A shard linked from storage that is not mounted was left out without a word: the run trained on the other
    shards only, and data_source.json listed them alone."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", ["from part 0"])
    (folder / "part-1.jsonl").symlink_to(tmp_path / "unmounted" / "part-1.jsonl")
    with pytest.raises(DataSourceError, match=rf"^data folder '{folder}' holds '{folder / 'part-1.jsonl'}', a link to "
                                              rf"'{tmp_path / 'unmounted' / 'part-1.jsonl'}', which cannot be read"):
        list(iter_documents(config(folder), TOKENIZER))


def test_folder_sources_follow_linked_folders_once_and_read_ndjson(tmp_path, caplog):
    """Shared storage is often linked in: a linked folder's files are read (they were left out silently), a
    folder linked twice or a link back to an ancestor only once. .ndjson is JSON lines; a .json file is left out
    with a warning."""
    shared = tmp_path / "shared"
    shared.mkdir()
    write_jsonl(shared / "b.jsonl", ["from the linked folder"])
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.ndjson", ["from ndjson"])
    (folder / "more").symlink_to(shared, target_is_directory=True)
    (folder / "same").symlink_to(shared, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="refine.data.sources"):
        assert [d.doc_id for d in iter_documents(config(folder), TOKENIZER)] == ["a.ndjson:1", "more/b.jsonl:1"]
    assert not caplog.records
    write_jsonl(folder / "c.json", ["JSON lines, misnamed"])
    with caplog.at_level(logging.WARNING, logger="refine.data.sources"):
        assert len(list(iter_documents(config(folder), TOKENIZER))) == 2
    assert "c.json" in caplog.text and "must end in .jsonl or .ndjson" in caplog.text


def test_folder_shards_keep_the_sorted_order_that_resumed_runs_count_records_in(tmp_path):
    # Plain sorted order, shard-10 before shard-2: a natural order would move a resumed run's cursor.
    for shard in (1, 2, 10):
        write_jsonl(tmp_path / f"shard-{shard}.jsonl", [f"s{shard}"])
    assert texts_of(iter_documents(config(tmp_path), TOKENIZER)) == ["s1", "s10", "s2"]


def test_a_dataset_dict_without_train_says_to_point_at_a_splits_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package reads save_to_disk folders")
    splits = {"validation": ["v1", "v2"], "test": ["e1"]}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts}) for name, texts in splits.items()}
                         ).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataSourceError, match=r"splits \['validation', 'test'\] and none named 'train': read one "
                                              rf"by pointing at its folder, e.g. '{tmp_path / 'dict' / 'validation'}'"):
        list(iter_documents(config(tmp_path / "dict"), TOKENIZER))
    assert texts_of(iter_documents(config(tmp_path / "dict" / "validation"), TOKENIZER)) == ["v1", "v2"]


# ---------------------------------------------------------------- shuffled reads

SHUFFLE_TEXTS = [f"record {i:02d} " + "w" * (i % 7) for i in range(40)]


def shuffle_source(tmp_path, fmt):
    """The same 40 texts in each format, spread over files, row groups or splits as a real source is."""
    if fmt == "jsonl":  # two files, a byte-order mark, blank lines between records
        folder = tmp_path / "jsonl"
        folder.mkdir()
        (folder / "a.jsonl").write_text("\ufeff" + "\n\n".join(json.dumps({"text": t}) for t in SHUFFLE_TEXTS[:25]) + "\n")
        write_jsonl(folder / "b.jsonl", SHUFFLE_TEXTS[25:])
        return folder
    if fmt == "parquet":
        folder = tmp_path / "parquet"
        folder.mkdir()
        pq.write_table(pa.table({"text": SHUFFLE_TEXTS[:24]}), folder / "a.parquet", row_group_size=5)
        pq.write_table(pa.table({"text": SHUFFLE_TEXTS[24:]}), folder / "b.parquet", row_group_size=7)
        return folder
    if fmt == "text":
        folder = tmp_path / "text"
        folder.mkdir()
        for i, text in enumerate(SHUFFLE_TEXTS):
            (folder / f"{i:03d}.txt").write_text(text)
        return folder
    import datasets

    datasets.Dataset.from_dict({"text": SHUFFLE_TEXTS}).save_to_disk(str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "text", "hf"])
def test_a_shuffled_read_visits_every_record_once_in_an_order_its_seed_draws(tmp_path, fmt):
    source = RowSource(shuffle_source(tmp_path, fmt), columns=["text"])
    assert source.record_count() == len(SHUFFLE_TEXTS)
    rows = list(source.shuffled_rows(seed=7))
    texts = [row.values["text"] for row in rows]
    assert sorted(texts) == SHUFFLE_TEXTS and texts != SHUFFLE_TEXTS
    assert [row.index for row in rows] == list(range(len(SHUFFLE_TEXTS)))  # positions: what the cursor counts
    assert [row.values["text"] for row in source.shuffled_rows(seed=7)] == texts
    assert [row.values["text"] for row in source.shuffled_rows(seed=8)] != texts
    # Rows still name the record they came from, e.g. "a.jsonl:3" is the text on line 3 of a.jsonl.
    unshuffled = {row.doc_id: row.values["text"] for row in source.rows()}
    assert all(unshuffled[row.doc_id] == row.values["text"] for row in rows)
    # Starting at a position reads the rest of the same order.
    assert [row.values["text"] for row in source.shuffled_rows(seed=7, start=13)] == texts[13:]
    # A limit shuffles the first records only.
    limited = [row.values["text"] for row in source.shuffled_rows(seed=7, limit=12)]
    assert sorted(limited) == SHUFFLE_TEXTS[:12]


def test_a_shuffled_parquet_read_decodes_each_row_group_once(tmp_path, monkeypatch):
    source = RowSource(shuffle_source(tmp_path, "parquet"), columns=["text"])
    reads = []
    read_group = source.reader._read_group
    monkeypatch.setattr(source.reader, "_read_group",
                        lambda number, group, *rest: reads.append((source.reader.files[number][0].name, group))
                        or read_group(number, group, *rest))
    texts = [row.values["text"] for row in source.shuffled_rows(seed=3)]
    assert sorted(texts) == SHUFFLE_TEXTS
    # Groups (a.parquet: 5 5 5 5 4 rows; b.parquet: 7 7 2) in a random order, each one's rows together.
    assert sorted(reads) == [("a.parquet", g) for g in range(5)] + [("b.parquet", g) for g in range(3)]
    assert reads != sorted(reads)
    sizes = [5, 5, 5, 5, 4, 7, 7, 2]  # a.parquet's row groups, then b.parquet's
    group_of = [group for group, size in enumerate(sizes) for _ in range(size)]
    records = [SHUFFLE_TEXTS.index(text) for text in texts]
    blocks, lengths = _runs([group_of[record] for record in records])
    assert sorted(blocks) == list(range(8)) and lengths == [sizes[block] for block in blocks]  # each group together
    assert blocks == [group if name == "a.parquet" else 5 + group for name, group in reads]
    assert records != sorted(records) and any(a > b for a, b in zip(records, records[1:]) if group_of[a] == group_of[b])


def _runs(values):
    """Consecutive equal values as (values, lengths)."""
    keys, lengths = [], []
    for value in values:
        if keys and keys[-1] == value:
            lengths[-1] += 1
        else:
            keys.append(value)
            lengths.append(1)
    return keys, lengths


@pytest.mark.parametrize("max_windows", [1, 3])
def test_a_shuffled_stream_resumes_exactly_after_every_document(tmp_path, max_windows, caplog):
    rows = [f"{letter}" * length for letter, length in zip("abcdefghij", [33, 3, 7, 70, 15, 8, 40, 2, 25, 12])]
    rows[4] = "   "  # blank
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows[:6]) + "{broken\n"
                    + "".join(json.dumps({"text": row}) + "\n" for row in rows[6:]))
    settings = config(path, min_length=6, max_length=8, max_windows=max_windows, shuffle_seed=11, skip_bad_rows=True)
    stream = DocumentStream(settings, TOKENIZER)
    documents = list(stream.iter_from(0))
    assert stream.stats.bad_rows == 1 and stream.stats.records_read == 11
    in_order = list(iter_documents(settings.model_copy(update={"shuffle_seed": None}), TOKENIZER))
    assert sorted(d.token_ids for d in documents) == sorted(d.token_ids for d in in_order)
    assert [d.doc_id for d in documents if d.window == 0] != [d.doc_id for d in in_order if d.window == 0]
    whole = [(d.doc_id, d.token_ids) for d in documents]
    for position, document in enumerate(documents):
        rest = [(d.doc_id, d.token_ids) for d in iter_documents(settings, TOKENIZER, cursor=document.next_cursor)]
        assert rest == whole[position + 1:]
    cursors = [d.next_cursor for d in documents]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)


def test_a_bad_row_in_a_shuffled_read_names_its_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 3}) + "\n" for i in range(8)) + "{broken\n")
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 9: malformed JSON"):
        list(iter_documents(config(path, shuffle_seed=0), TOKENIZER))


def test_a_jsonl_file_changed_since_it_was_indexed_is_indexed_again(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [f"document {i}" for i in range(5)])
    assert RowSource(path, columns=["text"]).record_count() == 5
    with path.open("a") as handle:
        handle.write(json.dumps({"text": "a sixth document, longer than the others"}) + "\n")
    source = RowSource(path, columns=["text"])
    assert source.record_count() == 6
    assert "a sixth document, longer than the others" in [row.values["text"] for row in source.shuffled_rows(seed=1)]


def test_a_shuffled_read_of_an_empty_source_says_so(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(EmptySourceError, match="holds no records"):
        list(RowSource(path, columns=["text"]).shuffled_rows(seed=0))


def test_shuffled_orders_are_the_same_whatever_the_numpy_version():
    """Drawn from PCG64's raw stream and SeedSequence, which NumPy keeps stable across versions: a run resumed
    after an upgrade reads its pass in the order it started. These values are those streams' for the seeds."""
    assert random_order(np.random.PCG64(7), 12).tolist() == [6, 3, 11, 4, 10, 9, 0, 2, 8, 7, 5, 1]
    assert [pass_shuffle_seed(0, 0), pass_shuffle_seed(0, 1)] == [15793235383387715774, 5836529245451711556]


def test_a_jsonl_file_changed_during_a_shuffled_pass_is_named_not_misread(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [f"document {i} " * 3 for i in range(6)])
    rows = RowSource(path, columns=["text"], policy=BadRowPolicy(skip_bad_rows=True)).shuffled_rows(seed=2)
    next(rows)  # the pass has indexed the file and is reading it
    write_jsonl(path, [f"another, longer document {i} " * 3 for i in range(6)])
    with pytest.raises(DataSourceError, match=r"JSON-lines file '.*docs.jsonl' changed during the run"):
        list(rows)


def test_a_parquet_file_replaced_during_a_shuffled_pass_is_named(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"document {i}" for i in range(12)]}), path, row_group_size=6)
    rows = RowSource(path, columns=["text"]).shuffled_rows(seed=2)
    next(rows)
    pq.write_table(pa.table({"text": [f"document {i}" for i in range(12)]}), path, row_group_size=4)
    with pytest.raises(DataSourceError, match=r"docs.parquet' changed during the run \(its size or modification "
                                              r"time\)"):
        list(rows)
    # Rewritten with the same row groups but other text: read on, it trained on documents of another file.
    pq.write_table(pa.table({"text": [f"document {i}" for i in range(12)]}), path, row_group_size=6)
    rows = RowSource(path, columns=["text"]).shuffled_rows(seed=2)
    next(rows)
    pq.write_table(pa.table({"text": [f"other text {i}" for i in range(12)]}), path, row_group_size=6)
    with pytest.raises(DataSourceError, match=r"docs.parquet' changed during the run"):
        list(rows)
