import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_sources import TOKENIZER, config, texts_of, write_jsonl

from refine.data.documents import DocumentStream, iter_documents
from refine.data.formats import detect_format
from refine.data.readers import RowSource, random_order
from refine.data.sources import (
    BadRowError,
    BadRowPolicy,
    DataSourceError,
    EmptySourceError,
    MissingColumnError,
)
from refine.data.stream import pass_shuffle_seed


# ---------------------------------------------------------------- formats


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


def test_format_hf_given_for_a_file_says_it_reads_a_folder(tmp_path):
    """datasets' own error said the file was "neither a `Dataset` directory nor a `DatasetDict` directory"."""
    path = write_jsonl(tmp_path / "docs.jsonl", ["one"])
    with pytest.raises(DataSourceError, match=rf"^format 'hf' reads a folder written by datasets' save_to_disk, but "
                                              rf"data path '{path}' is a file: give its format \(or auto\)"):
        list(iter_documents(config(path, format="hf"), TOKENIZER))


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


def test_a_jsonl_row_that_is_not_an_object_is_a_bad_row_naming_its_type(tmp_path):
    """A string row holding the column name passed a substring check, a list was told its column is missing."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first"}\n[1, 2]\n"text"\n42\n{"text": "last"}\n')
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: expected a JSON object, got list"):
        list(iter_documents(config(path), TOKENIZER))
    stream = DocumentStream(config(path, skip_bad_rows=True), TOKENIZER)
    assert texts_of(stream) == ["first", "last"] and stream.stats.bad_rows == 3


def test_a_column_given_twice_in_a_row_is_a_bad_row_and_other_repeated_keys_are_harmless(tmp_path):
    """{"text": "a", "text": "b"} was read as "b", counted as a good row: which value was meant cannot be told."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one", "meta": 1, "meta": 2}\n{"text": "two", "tag": {"x": 1, "x": 2}}\n'
                    '{"text": "short", "id": 3, "text": "three"}\n')
    received = []
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 3: column 'text' given more than once in the row"):
        for document in iter_documents(config(path), TOKENIZER):
            received.append(document)
    assert texts_of(received) == ["one", "two"]
    assert texts_of(iter_documents(config(path, skip_bad_rows=True), TOKENIZER)) == ["one", "two"]


def test_malformed_jsonl_row_raises_with_line_after_yielding_earlier_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    received = []
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: malformed JSON"):
        for document in iter_documents(config(path), TOKENIZER):
            received.append(document)
    assert texts_of(received) == ["one"]


def test_undecodable_bytes_raise_without_skip(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xc3\x28"}\n')
    with pytest.raises(BadRowError, match=r"docs.jsonl, line 2: undecodable UTF-8 at byte 10"):
        list(iter_documents(config(path), TOKENIZER))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(BadRowError, match=r"bad.txt: undecodable UTF-8 at byte 3"):
        list(iter_documents(config(tmp_path / "txt"), TOKENIZER))


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


def test_a_leading_byte_order_mark_is_not_data(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n" + json.dumps({"text": "second"}).encode())
    assert texts_of(iter_documents(config(jsonl), TOKENIZER)) == ["first", "second"]  # line 1 was a bad row
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(b"\xef\xbb\xbfalpha")
    assert texts_of(iter_documents(config(tmp_path / "corpus"), TOKENIZER)) == ["alpha"]  # not "\ufeffalpha"


# ---------------------------------------------------------------- review fixes


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
