import logging
import os

import pytest
from test_data_sources import TOKENIZER, config, texts_of, write_jsonl

from refine.data.documents import iter_documents
from refine.data.formats import detect_format
from refine.data.sources import DataSourceError


# ---------------------------------------------------------------- bad input


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


# ---------------------------------------------------------------- review fixes


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
    with caplog.at_level(logging.WARNING, logger="refine.data.formats"):
        assert [d.doc_id for d in iter_documents(config(folder), TOKENIZER)] == ["a.ndjson:1", "more/b.jsonl:1"]
    assert not caplog.records
    write_jsonl(folder / "c.json", ["JSON lines, misnamed"])
    with caplog.at_level(logging.WARNING, logger="refine.data.formats"):
        assert len(list(iter_documents(config(folder), TOKENIZER))) == 2
    assert "c.json" in caplog.text and "must end in .jsonl or .ndjson" in caplog.text


def test_folder_shards_keep_the_sorted_order_that_resumed_runs_count_records_in(tmp_path):
    # Plain sorted order, shard-10 before shard-2: a natural order would move a resumed run's cursor.
    for shard in (1, 2, 10):
        write_jsonl(tmp_path / f"shard-{shard}.jsonl", [f"s{shard}"])
    assert texts_of(iter_documents(config(tmp_path), TOKENIZER)) == ["s1", "s10", "s2"]
