"""Document sources: parquet, JSON lines, plain-text directories and `datasets.save_to_disk` folders.

Two layers:
- `RowSource` reads records (dicts of the asked columns) from any source with one bad-input policy:
  a malformed or undecodable record raises `BadRowError` naming the file and row, or, with
  `skip_bad_rows`, is logged with its location, counted and skipped. Never silently.
- `DocumentStream` turns records into `TokenizedDocument`s: tokenize in batches, add BOS / EOS, drop
  documents shorter than `min_length` (counted), split a longer one into windows of `max_length` tokens,
  at most `max_windows` of them, and drop the rest (counted as truncated).

Every record has an index in the whole source (files in sorted order, bad and filtered records included).
A stream reads records in that order, or, with `shuffle_seed`, in a random order drawn from the seed (every
record once; see `RowSource.shuffled_rows`); a record's position in the order read is its `Row.index`.
The data cursor counts windows inside records: `position x max_windows + windows of it used`, so with
the default `max_windows=1` it is the position. `DocumentStream.iter_from(cursor)` restarts exactly
after the last document a consumer used (`document.next_cursor`), even inside a record.
"""

from __future__ import annotations

import bisect
import codecs
import json
import logging
import os
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from refine.runtime import progress_bar
from refine.tokenizer import ByteTokenizer, Tokenizer

logger = logging.getLogger(__name__)

SourceFormat = Literal["parquet", "jsonl", "text", "hf"]
FormatName = Literal["auto", "parquet", "jsonl", "text", "hf"]  # what a config may name; auto: detect_format
_EXTENSIONS: dict[str, SourceFormat] = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".7z", ".br", ".snappy")
# Files `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the folder's top level.
_HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
# The most windows a document may be split into. The data cursor is record index x max_windows + window,
# and this keeps it an int64 (checkpoints, stream messages) for sources of up to 2^43 records.
MAX_WINDOWS = 1 << 20


class DataSourceError(ValueError):
    """Bad data input; the message names the source and what is wrong."""


class EmptySourceError(DataSourceError):
    pass


class MissingColumnError(DataSourceError):
    def __init__(self, column: str, present: list[str], where: str) -> None:
        self.column, self.present, self.where = column, list(present), where
        super().__init__(f"column {column!r} not found in {where}; columns present: {self.present}")


class BadRowError(DataSourceError):
    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        super().__init__(f"{location}: {reason} (--set data.skip_bad_rows=true skips and counts such rows)")


def check_min_length(value: int, field: str) -> int:
    """`value`, a minimum document length named `field`, or a ValueError: a document of one token (an empty
    text's BOS) has nothing to predict, and training would fail on it far from the setting."""
    if value < 2:
        raise ValueError(f"{field}={value} keeps documents with nothing to train on: next-token prediction needs "
                         f"at least 2 tokens (one to predict from, one to predict), so {field} must be >= 2")
    return value


class DataConfig(BaseModel):
    """Where documents come from and how they are filtered."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    format: FormatName = "auto"
    text_column: str = Field("text", min_length=1)
    # Length bounds are in tokens, BOS / EOS included: what the model sees.
    min_length: int = 2
    max_length: int | None = Field(None, ge=1)
    # A document longer than max_length becomes up to this many windows of max_length tokens (the last one
    # kept if it has min_length tokens); what is past them is cut. 1: the first window only.
    max_windows: int = Field(1, ge=1, le=MAX_WINDOWS)
    add_bos: bool = True
    add_eos: bool = False
    skip_bad_rows: bool = False
    # Read at most this many records (before filtering): keeps the cursor meaning fixed.
    limit: int | None = Field(None, ge=1)
    # None: records in the source's order; else in a random order drawn from this seed (RowSource.shuffled_rows).
    shuffle_seed: int | None = Field(None, ge=0)
    # For a saved DatasetDict; None picks "train", or the only split.
    split: str | None = None
    tokenize_batch_size: int = Field(64, ge=1)
    show_progress: bool = True

    @field_validator("min_length")
    @classmethod
    def _trainable_length(cls, value: int) -> int:
        return check_min_length(value, "min_length")

    @model_validator(mode="after")
    def _check_bounds(self) -> "DataConfig":
        if self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) is larger than max_length ({self.max_length})")
        if self.max_windows > 1 and self.max_length is None:
            raise ValueError(f"max_windows={self.max_windows} needs a max_length: windows are max_length tokens")
        return self


@dataclass(frozen=True, slots=True)
class TokenizedDocument:
    doc_id: str  # "<file>:<row>", then "#<window>" for a long document's later windows: readable in logs
    index: int  # its record's position in the order read (the record index in the source, unless shuffled)
    token_ids: list[int]
    next_cursor: int  # the data cursor after this document: resume with iter_from(next_cursor)
    truncated: bool = False  # tokens of its record past this document's windows were dropped
    window: int = 0  # which window of its record (0: the record's start, with its BOS)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DataStats(BaseModel):
    records_read: int = 0
    documents: int = 0
    tokens: int = 0
    too_short: int = 0
    blank: int = 0  # texts of nothing but whitespace and control characters (see is_blank)
    truncated: int = 0  # records whose tokens past max_windows x max_length were dropped
    split: int = 0  # records that became more than one document (max_windows > 1)
    short_tails: int = 0  # last windows shorter than min_length, dropped
    bad_rows: int = 0


@dataclass(slots=True)
class Row:
    index: int  # the record's position in the order read: its index in the source, unless shuffled
    location: str  # "file, row N" or "file, line N": for error messages
    doc_id: str
    values: dict[str, Any] = field(default_factory=dict)
    rejected: bool = False  # a skipping policy already logged and counted it


class BadRowPolicy:
    """Raise on a bad row, or log it with its location and count it."""

    def __init__(self, skip_bad_rows: bool) -> None:
        self.skip_bad_rows = skip_bad_rows
        self.count = 0

    def reject(self, location: str, reason: str) -> None:
        if not self.skip_bad_rows:
            raise BadRowError(location, reason)
        self.count += 1
        logger.warning("skipping bad row %s: %s", location, reason)


def _compressed(name: str) -> bool:
    """Whether a file name is a data file's compressed form, e.g. part-0.jsonl.gz."""
    parts = name.lower().rsplit(".", 2)
    return len(parts) == 3 and f".{parts[1]}" in _EXTENSIONS and f".{parts[2]}" in _COMPRESSED


_warned_folders: set[str] = set()


def _folder_files(folder: Path) -> list[Path]:
    """The data files under a folder, each read with the format of its extension (in any case: B.JSONL as
    a single file is read too), in sorted order: the order that numbers their records.

    Hidden files and folders (names starting with ".") are left out: .ipynb_checkpoints and the like hold
    copies, whose documents would be read twice. Linked folders are followed (shared storage is often linked
    in), each real folder once: the first path to it in sorted order names its files. A compressed data file
    (part-0.jsonl.gz) fails naming it, as does a link to a data file that is not there (its storage not mounted):
    a run that silently left it out would train on part of the data the user pointed at. Other files are left out
    (README.md, a hub repository's dataset_infos.json), .json ones with a warning, since JSON lines are sometimes
    named so (they must end in .jsonl or .ndjson)."""
    files: list[Path] = []
    walked: set[Path] = set()  # real folders: a link to a folder walked already (or to an ancestor) is not walked
    left_out_json: list[str] = []
    for directory, folders, names in os.walk(folder, followlinks=True):
        real = Path(directory).resolve()
        if real in walked:
            folders[:] = []
            continue
        walked.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # sorted: the walk's order
        for name in names:
            if name.startswith("."):
                continue
            if _compressed(name):
                raise DataSourceError(
                    f"data folder {str(folder)!r} holds {str(Path(directory, name))!r}, a compressed file, which "
                    f"cannot be read: decompress it, or move it out of the folder"
                )
            file = Path(directory, name)
            if Path(name).suffix.lower() in _EXTENSIONS and file.is_file():
                files.append(file)
            elif Path(name).suffix.lower() in _EXTENSIONS and file.is_symlink():  # a shard on storage not mounted
                raise DataSourceError(f"data folder {str(folder)!r} holds {str(file)!r}, a link to "
                                      f"{os.readlink(file)!r}, which cannot be read: mount or restore its target, "
                                      f"or remove the link")
            elif name.lower().endswith(".json"):
                left_out_json.append(str(file))
    if left_out_json and files and str(folder) not in _warned_folders:  # once: a run lists its folders often
        _warned_folders.add(str(folder))
        logger.warning("data folder %r: %d .json file(s) left out (%s): JSON-lines files must end in .jsonl or "
                       ".ndjson to be read", str(folder), len(left_out_json), ", ".join(sorted(left_out_json)[:3]))
    # Plain sorted order (shard-10 before shard-2), as runs recorded their sources in: a resumed run's data
    # cursor counts records in this order, so another order would make it resume elsewhere.
    return sorted(files)


def detect_format(path: str | Path) -> SourceFormat:
    """Format from a file's extension, or from what a folder holds."""
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if location.is_file():
        suffix = location.suffix.lower()
        if suffix in _EXTENSIONS:
            return _EXTENSIONS[suffix]
        if _compressed(location.name):
            raise DataSourceError(f"{str(path)!r} is a compressed file, which cannot be read: decompress it")
        raise DataSourceError(
            f"cannot tell the format of {str(path)!r} from its extension {suffix!r}: "
            f"expected one of {sorted(_EXTENSIONS)} or set format explicitly"
        )
    if not location.is_dir():  # a FIFO, a device (a link to /dev/zero): no records to count or resume in
        raise DataSourceError(f"data path {str(path)!r} is neither a regular file nor a folder")
    if any((location / marker).is_file() for marker in _HF_MARKERS):
        return "hf"
    found = sorted({_EXTENSIONS[file.suffix.lower()] for file in _folder_files(location)})
    if not found:
        raise EmptySourceError(
            f"data folder {str(path)!r} holds no {sorted(_EXTENSIONS)} files and no save_to_disk dataset"
        )
    if len(found) > 1:
        raise DataSourceError(f"data folder {str(path)!r} mixes formats {found}: set format explicitly")
    return found[0]


def source_files(path: str | Path, fmt: SourceFormat) -> list[Path]:
    """The files of a file-based source, in the order their records are numbered."""
    location = Path(path)
    if location.is_file():
        return [location]
    files = [file for file in _folder_files(location) if _EXTENSIONS[file.suffix.lower()] == fmt]
    if not files:
        suffixes = " or ".join(f"*{suffix}" for suffix, of in _EXTENSIONS.items() if of == fmt)
        raise EmptySourceError(f"data folder {str(path)!r} holds no {suffixes} files")
    return files


def _undecodable(raw: bytes, error: UnicodeDecodeError) -> str:
    return f"undecodable UTF-8 at byte {error.start}: {raw[error.start:error.start + 8]!r}"


def _file_label(file: Path, root: Path) -> str:
    return file.name if root.is_file() else str(file.relative_to(root))


# ---------------------------------------------------------------- readers
# Each reader yields Row objects with start <= index < stop (stop None: to the end), and knows its record
# count when cheap. Records past `stop` are never parsed, so a bad one there cannot fail a limited read.
# For a shuffled read, `rows_at` reads records by their index in the source, in the order given.


def random_order(bits: np.random.PCG64, count: int) -> np.ndarray:
    """A random permutation of range(count): indices sorted by random 64-bit keys. The keys are the bit
    generator's raw stream, which NumPy keeps the same across versions (Generator.permutation's algorithm may
    change), so a run resumed after an upgrade still reads its pass in the order it started."""
    return np.argsort(bits.random_raw(count), kind="stable")


class _ParquetReader:
    """Parquet files, each opened only while its rows are read: a folder of thousands of shards must not
    hold one open file per shard (past the open-files limit). Their footers, read once here, give the
    columns and the row counts."""

    def __init__(self, path: Path, columns: list[str], optional_columns: list[str]) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as error:  # pragma: no cover - pyarrow is a dependency
            raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from error
        self.root = path
        # (file, rows of each row group); read_metadata / read_schema close the file they open.
        self.files: list[tuple[Path, list[int]]] = []
        # Each file's columns to read: the required ones and the optional ones it has (a folder's files may differ,
        # as JSON-lines records may: an optional column one file lacks is still read from the others).
        self.file_columns: list[list[str]] = []
        names: list[list[str]] = []
        for file in source_files(path, "parquet"):
            try:
                metadata = pq.read_metadata(file)
                present = pq.read_schema(file).names
            except (pa.ArrowException, OSError) as error:  # not parquet, or a damaged footer
                raise DataSourceError(f"parquet file {str(file)!r} cannot be opened ({error})") from error
            for column in columns:
                if column not in present:
                    raise MissingColumnError(column, present, f"parquet file {str(file)!r}")
            self.files.append((file, [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]))
            self.file_columns.append(list(columns) + [c for c in optional_columns if c in present and c not in columns])
            names.append(present)
        present_everywhere = set.intersection(*(set(present) for present in names))
        self.present = [name for name in names[0] if name in present_everywhere]

    def count(self) -> int:
        return sum(sum(groups) for _, groups in self.files)

    def _row_groups(self) -> list[tuple[int, int, int, int, int]]:
        """Every row group: (index of its first record, file number, group, its first row in the file, rows)."""
        table, index = [], 0
        for number, (_, groups) in enumerate(self.files):
            row_in_file = 0
            for group, rows in enumerate(groups):
                table.append((index, number, group, row_in_file, rows))
                index += rows
                row_in_file += rows
        return table

    def shuffled_order(self, bits: np.random.PCG64, count: int) -> np.ndarray:
        """Row groups in a random order, each one's rows in a random order: a parquet row is read by decoding
        its whole row group, so a permutation of all records would decode a group per record."""
        parts = []
        groups = [(start, min(rows, count - start)) for start, _, _, _, rows in self._row_groups() if start < count]
        for group in random_order(bits, len(groups)):
            start, rows = groups[group]
            parts.append(start + random_order(bits, rows))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def rows_at(self, records: np.ndarray, first: int) -> Iterator[Row]:
        table = self._row_groups()
        starts = [start for start, *_ in table]
        versions = [_version(file.stat()) for file, _ in self.files]  # a file rewritten during this pass stops it
        decoded: tuple[int, dict[str, list[Any]]] | None = None  # the last row group read, by its slot
        for position, record in enumerate(map(int, records), start=first):
            slot = bisect.bisect_right(starts, record) - 1
            start, number, group, first_row, rows = table[slot]
            if decoded is None or decoded[0] != slot:
                decoded = (slot, self._read_group(number, group, first_row, rows, versions[number]))
            file, offset = self.files[number][0], record - start
            yield Row(index=position, location=f"{file}, row {first_row + offset}",
                      doc_id=f"{_file_label(file, self.root)}:{first_row + offset}",
                      values={column: column_values[offset] for column, column_values in decoded[1].items()})

    def _read_group(self, number: int, group: int, first_row: int, rows: int,
                    version: tuple[int, int]) -> dict[str, list[Any]]:
        """The values of row group `group` of file `number`, by column; the file must still be at `version` (its
        size and modification time when the pass started), as the pass's order counts its rows then."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        file, columns = self.files[number][0], self.file_columns[number]
        values: dict[str, list[Any]] = {column: [] for column in columns}
        try:
            handle = open(file, "rb")
        except OSError as error:  # removed since it was listed
            raise DataSourceError(f"parquet file {str(file)!r} cannot be opened ({error})") from error
        with handle:
            if _version(os.fstat(handle.fileno())) != version:
                raise DataSourceError(f"parquet file {str(file)!r} changed during the run (its size or modification "
                                      f"time): this pass's order counts the rows it held when the pass started")
            try:
                parquet = pq.ParquetFile(handle)
            except (pa.ArrowException, OSError) as error:  # damaged
                raise DataSourceError(f"parquet file {str(file)!r} cannot be opened ({error})") from error
            with parquet:
                for batch in self._batches(number, parquet, group, first_row, rows):
                    for column, column_values in batch.items():
                        values[column].extend(column_values)
        if len(values[columns[0]]) != rows:  # the file was replaced since its footer was read
            raise DataSourceError(f"parquet file {str(file)!r}, row group {group}: {len(values[columns[0]])} rows, "
                                  f"where the file had {rows} when this pass started: it changed during the run")
        return values

    def _batches(self, number: int, parquet: Any, group: int, first_row: int,
                 num_rows: int) -> Iterator[dict[str, list[Any]]]:
        """The record batches of one row group of file `number`, as Python values by column; a damaged page, or a
        value Python cannot hold (a date32 past year 9999), fails naming the file, the group and its rows."""
        import pyarrow as pa

        file = self.files[number][0]
        batches = parquet.iter_batches(row_groups=[group], columns=self.file_columns[number], batch_size=1024)
        while True:
            try:
                batch = next(batches).to_pydict()
            except StopIteration:
                return
            except (pa.ArrowException, OSError, ValueError, OverflowError) as error:
                raise DataSourceError(
                    f"parquet file {str(file)!r}, row group {group} (rows {first_row}-{first_row + num_rows - 1}): "
                    f"cannot be read ({type(error).__name__}: {error})"
                ) from error
            yield batch

    def rows(self, start: int, stop: int | None) -> Iterator[Row]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        index = 0
        for number, (file, groups) in enumerate(self.files):
            if stop is not None and index >= stop:
                return
            if index + sum(groups) <= start:  # whole file before the cursor: skip without opening it
                index += sum(groups)
                continue
            label = _file_label(file, self.root)
            file_start = index
            try:
                parquet = pq.ParquetFile(file)
            except (pa.ArrowException, OSError) as error:  # replaced or damaged since it was listed
                raise DataSourceError(f"parquet file {str(file)!r} cannot be opened ({error})") from error
            with parquet:
                for group, group_rows in enumerate(groups):
                    if index + group_rows <= start:
                        index += group_rows
                        continue
                    row_in_file = index - file_start
                    for values in self._batches(number, parquet, group, row_in_file, group_rows):
                        for offset in range(len(next(iter(values.values())))):
                            if stop is not None and index >= stop:
                                return
                            if index >= start:
                                yield Row(
                                    index=index,
                                    location=f"{file}, row {row_in_file}",
                                    doc_id=f"{label}:{row_in_file}",
                                    values={column: column_values[offset] for column, column_values in values.items()},
                                )
                            index += 1
                            row_in_file += 1


def _version(status: os.stat_result) -> tuple[int, int]:
    """What tells a file's versions apart, cheaply: its size and modification time."""
    return status.st_size, status.st_mtime_ns


@lru_cache(maxsize=1 << 16)  # a folder of shards: every file's index, so a pass does not scan them twice
def _jsonl_records(path: str, size: int, mtime_ns: int) -> tuple[array, array]:
    """Where each record of a JSON-lines file starts: byte offsets and line numbers (blank lines are not
    records). Kept per file version (size and modification time), so later passes do not scan again."""
    offsets, line_numbers = array("q"), array("q")
    offset = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if _has_text(raw.removeprefix(codecs.BOM_UTF8) if line_number == 1 else raw):
                offsets.append(offset)
                line_numbers.append(line_number)
            offset += len(raw)
    return offsets, line_numbers


class _JsonlReader:
    def __init__(self, path: Path, columns: list[str], optional_columns: list[str], policy: BadRowPolicy) -> None:
        self.root = path
        self.files = source_files(path, "jsonl")
        self.columns = list(columns)
        self.optional_columns = list(optional_columns)
        self.policy = policy

    def count(self) -> int | None:
        return None  # would need a full read

    def indexed_count(self) -> int:
        return sum(len(offsets) for offsets, _ in self._index()[1])

    def _index(self) -> tuple[list[tuple[int, int]], list[tuple[array, array]]]:
        """Each file's version now, and where its records start in that version."""
        versions = [_version(file.stat()) for file in self.files]
        return versions, [_jsonl_records(str(file), *version) for file, version in zip(self.files, versions)]

    def rows(self, start: int, stop: int | None) -> Iterator[Row]:
        index = 0
        for file in self.files:
            label = _file_label(file, self.root)
            with open(file, "rb") as handle:
                for line_number, raw in enumerate(handle, start=1):
                    if line_number == 1:
                        raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows start files with one
                    if not _has_text(raw):  # blank lines (e.g. a trailing newline) are not records
                        continue
                    if stop is not None and index >= stop:
                        return
                    if index < start:
                        index += 1
                        continue
                    yield self._row(index, raw, file, label, line_number)
                    index += 1

    def rows_at(self, records: np.ndarray, first: int) -> Iterator[Row]:
        versions, indexes = self._index()
        ends = np.cumsum([len(offsets) for offsets, _ in indexes]).tolist()  # records before each file's end
        open_file: tuple[int, Any] | None = None  # one file open at a time: a folder may hold thousands
        try:
            for position, record in enumerate(map(int, records), start=first):
                number = bisect.bisect_right(ends, record)
                offsets, line_numbers = indexes[number]
                within = record - (ends[number - 1] if number else 0)
                if open_file is None or open_file[0] != number:
                    if open_file is not None:
                        open_file[1].close()
                    open_file = (number, open(self.files[number], "rb"))
                handle = open_file[1]
                if _version(os.fstat(handle.fileno())) != versions[number]:  # the offsets are another version's
                    raise DataSourceError(f"JSON-lines file {str(self.files[number])!r} changed during the run "
                                          f"(its size or modification time): its records were indexed before")
                handle.seek(offsets[within])
                raw, line_number = handle.readline(), line_numbers[within]
                if line_number == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                file = self.files[number]
                yield self._row(position, raw, file, _file_label(file, self.root), line_number)
        finally:
            if open_file is not None:
                open_file[1].close()

    def _row(self, index: int, raw: bytes, file: Path, label: str, line_number: int) -> Row:
        location = f"{file}, line {line_number}"
        row = Row(index=index, location=location, doc_id=f"{label}:{line_number}")
        values = self._parse(raw, location)
        if values is None:
            row.rejected = True
        else:
            row.values = values
        return row

    def _parse(self, raw: bytes, location: str) -> dict[str, Any] | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            self.policy.reject(location, _undecodable(raw, error))
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            # Again without its line terminator (a copy, made only here), so that an error at the end of the line
            # reports a column on this line.
            try:
                json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                self.policy.reject(location, f"malformed JSON ({error.msg}: column {error.colno})")
            return None
        except (ValueError, RecursionError) as error:
            # Valid JSON that Python cannot hold: an integer past the int-string limit, nesting past the stack.
            self.policy.reject(location, f"unreadable JSON ({error})")
            return None
        if not isinstance(record, dict):
            self.policy.reject(location, f"expected a JSON object, got {type(record).__name__}")
            return None
        for column in self.columns:
            if column not in record:
                self.policy.reject(location, f"column {column!r} missing; keys present: {sorted(record)}")
                return None
        wanted = self.columns + [c for c in self.optional_columns if c in record and c not in self.columns]
        return {column: record[column] for column in wanted}


class _TextReader:
    """One document per *.txt file, under the column name the consumer asks for."""

    def __init__(self, path: Path, text_column: str, policy: BadRowPolicy) -> None:
        self.root = path
        self.files = source_files(path, "text")
        self.text_column = text_column
        self.policy = policy

    def count(self) -> int:
        return len(self.files)

    def rows(self, start: int, stop: int | None) -> Iterator[Row]:
        end = len(self.files) if stop is None else min(stop, len(self.files))
        return self.rows_at(np.arange(start, end), start) if start < end else iter(())

    def rows_at(self, records: np.ndarray, first: int) -> Iterator[Row]:
        for index, record in enumerate(map(int, records), start=first):
            file = self.files[record]
            location = str(file)
            row = Row(index=index, location=location, doc_id=_file_label(file, self.root))
            raw = file.read_bytes()
            try:
                row.values = {self.text_column: raw.decode("utf-8-sig")}  # a leading byte-order mark is not text
            except UnicodeDecodeError as error:
                self.policy.reject(location, _undecodable(raw, error))
                row.rejected = True
            yield row


class _HFReader:
    def __init__(self, path: Path, columns: list[str], optional_columns: list[str], split: str | None) -> None:
        try:
            import datasets
        except ImportError as error:
            raise ImportError("reading a save_to_disk dataset needs `datasets`: pip install datasets") from error
        try:
            loaded = datasets.load_from_disk(str(path))
        except OSError:
            raise
        except Exception as error:  # a damaged dataset_dict.json / state.json: KeyError, JSONDecodeError, ...
            raise DataSourceError(f"dataset {str(path)!r} cannot be read as a save_to_disk dataset: "
                                  f"{type(error).__name__}: {error}") from None
        self.where = f"dataset {str(path)!r}"
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded.keys())
            if split is None:
                split = "train" if "train" in loaded else (splits[0] if len(splits) == 1 else None)
                if split is None:
                    # save_to_disk writes each split to a folder of its own, which reads as a single Dataset.
                    raise DataSourceError(f"{self.where} has splits {splits} and none named 'train': read one "
                                          f"by pointing at its folder, e.g. {str(path / splits[0])!r}")
            if split not in loaded:
                raise DataSourceError(f"split {split!r} not in {self.where}; splits present: {splits}")
            loaded = loaded[split]
            self.where = f"dataset {str(path)!r} split {split!r}"
        elif split is not None:
            raise DataSourceError(f"split {split!r} given but {self.where} is a single Dataset without splits")
        present = list(loaded.column_names)
        self.present = present
        for column in columns:
            if column not in present:
                raise MissingColumnError(column, present, self.where)
        self.columns = list(columns) + [c for c in optional_columns if c in present and c not in columns]
        self.dataset = loaded.select_columns(self.columns)

    def count(self) -> int:
        return len(self.dataset)

    def rows_at(self, records: np.ndarray, first: int) -> Iterator[Row]:
        for index, record in enumerate(map(int, records), start=first):
            values = self.dataset[record]
            yield Row(index=index, location=f"{self.where}, row {record}", doc_id=f"row:{record}",
                      values={column: values[column] for column in self.columns})

    def rows(self, start: int, stop: int | None, batch_size: int = 256) -> Iterator[Row]:
        total = len(self.dataset) if stop is None else min(len(self.dataset), stop)
        for begin in range(start, total, batch_size):
            end = min(begin + batch_size, total)
            batch = self.dataset[begin:end]
            for offset in range(end - begin):
                index = begin + offset
                yield Row(
                    index=index,
                    location=f"{self.where}, row {index}",
                    doc_id=f"row:{index}",
                    values={column: batch[column][offset] for column in self.columns},
                )


class RowSource:
    """A source opened once: its record count (when cheap) and its records from any cursor."""

    def __init__(
        self,
        path: str | Path,
        *,
        columns: list[str],
        optional_columns: list[str] | tuple[str, ...] = (),
        fmt: str = "auto",
        policy: BadRowPolicy | None = None,
        split: str | None = None,
    ) -> None:
        self.path = str(path)
        self.policy = policy or BadRowPolicy(skip_bad_rows=False)
        location = Path(path).expanduser()
        if not location.exists():
            raise FileNotFoundError(f"data path {str(path)!r} does not exist")
        resolved = detect_format(location) if fmt == "auto" else fmt
        columns, optional = list(columns), list(optional_columns)
        self.reader: _ParquetReader | _JsonlReader | _TextReader | _HFReader
        if resolved == "parquet":
            self.reader = _ParquetReader(location, columns, optional)
        elif resolved == "jsonl":
            self.reader = _JsonlReader(location, columns, optional, self.policy)
        elif resolved == "text":
            if len(columns) != 1:
                raise DataSourceError(f"a plain-text source has one text per file; cannot provide columns {columns}")
            self.reader = _TextReader(location, columns[0], self.policy)
        elif resolved == "hf":
            self.reader = _HFReader(location, columns, optional, split)
        else:
            raise DataSourceError(f"unknown data format {fmt!r}: expected auto, parquet, jsonl, text or hf")
        self.format: SourceFormat = resolved  # type: ignore[assignment]

    def count(self) -> int | None:
        return self.reader.count()

    def record_count(self) -> int:
        """How many records the source holds; a JSON-lines source is indexed to know (see _jsonl_records)."""
        known = self.reader.count()
        return self.reader.indexed_count() if known is None else known  # type: ignore[union-attr]

    def schema_columns(self) -> list[str] | None:
        """Columns every record has, for sources with a schema (parquet, save_to_disk); None otherwise."""
        return list(self.reader.present) if isinstance(self.reader, (_ParquetReader, _HFReader)) else None

    def rows(self, start: int = 0, limit: int | None = None) -> Iterator[Row]:
        """Records from index `start` (rows the skipping policy rejected are left out); indices below
        `limit` only. Raises EmptySourceError when the source holds no record at all."""
        if start < 0:
            raise ValueError(f"start cursor must be >= 0, got {start}")
        if self.count() == 0:
            raise EmptySourceError(f"data source {self.path!r} holds no records")
        seen_any = False
        for row in self.reader.rows(start, limit):
            seen_any = True
            if not row.rejected:
                yield row
        if not seen_any and start == 0:
            raise EmptySourceError(f"data source {self.path!r} holds no records")


    def shuffled_rows(self, seed: int, start: int = 0, limit: int | None = None) -> Iterator[Row]:
        """Every record with an index below `limit` once, in a random order drawn from `seed`, from position
        `start` of that order; a row's `index` is its position. Parquet keeps each row group's rows together
        (row groups in a random order, each one's rows in a random order): a row is read by decoding its row
        group. Raises EmptySourceError when the source holds no record at all."""
        if start < 0:
            raise ValueError(f"start cursor must be >= 0, got {start}")
        count = self.record_count()
        if count == 0:
            raise EmptySourceError(f"data source {self.path!r} holds no records")
        bits, count = np.random.PCG64(seed), count if limit is None else min(count, limit)
        order = (self.reader.shuffled_order(bits, count) if isinstance(self.reader, _ParquetReader)
                 else random_order(bits, count))
        for row in self.reader.rows_at(order[start:], start):
            if not row.rejected:
                yield row


def _has_text(raw: bytes) -> bool:
    """Whether a line holds more than whitespace (no copy of it: a line may be hundreds of megabytes)."""
    return bool(raw) and not raw.isspace()


# A JSON escape such as "\ud800" decodes to a lone surrogate, which no tokenizer can encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def require_text(value: Any, column: str, location: str, policy: BadRowPolicy) -> str | None:
    """The column's value as str, or None after the policy rejected it (null, bytes that are not UTF-8, ...)."""
    if isinstance(value, str):
        surrogate = _SURROGATE.search(value)  # a search, not an encoded copy of a text of hundreds of megabytes
        if surrogate is not None:
            policy.reject(location, f"column {column!r} holds a lone surrogate {surrogate.group()!r} "
                                    f"at character {surrogate.start()}, not encodable as UTF-8")
            return None
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            policy.reject(location, f"column {column!r} holds undecodable UTF-8 at byte {error.start}")
            return None
    kind = "null" if value is None else type(value).__name__
    policy.reject(location, f"column {column!r} must hold text, got {kind}: {value!r:.80}")
    return None


# Whitespace and control characters (NUL, C1 controls): a text of only these has nothing to learn from.
_BLANK = re.compile(r"[\s\x00-\x1f\x7f-\x9f]*")


def is_blank(text: str) -> bool:
    """Whether `text` holds nothing but whitespace and control characters (an empty text included)."""
    return _BLANK.fullmatch(text) is not None


# Characters per token that a document's head may hold before it is cut (see DocumentStream._head); tokens
# average about 4 characters of text, and one byte-level token never covers more than one character.
HEAD_CHARS_PER_TOKEN = 32
_LAST_WHITESPACE = re.compile(r"\s\S*\Z")  # searched within [start, end): the last whitespace there


class DocumentStream:
    """Tokenized documents of a source; iterate it, or restart anywhere with `iter_from(cursor)`.

    `cursor` is the data cursor after the last document handed out (record position x max_windows + windows
    of that record used; the position when max_windows is 1: the record index, unless shuffled); save it with
    a checkpoint and pass it to `iter_from` to continue. `stats` counts what was read, kept, filtered,
    truncated and skipped."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.cursor = 0
        self.stats = DataStats()
        self._resume_record = self._windows_used = 0

    def __iter__(self) -> Iterator[TokenizedDocument]:
        return self.iter_from(self.cursor)

    def iter_from(self, cursor: int) -> Iterator[TokenizedDocument]:
        config = self.config
        if cursor < 0:
            raise ValueError(f"start cursor must be >= 0, got {cursor}")
        # A cursor inside a record: that record's first windows were used already.
        self._resume_record, self._windows_used = divmod(cursor, config.max_windows)
        record = self._resume_record
        policy = BadRowPolicy(config.skip_bad_rows)
        source = self.row_source(policy)
        if config.shuffle_seed is None:
            rows, known = source.rows(record, config.limit), source.count()
        else:
            rows, known = source.shuffled_rows(config.shuffle_seed, record, config.limit), source.record_count()
        self.cursor = cursor
        if known is not None and config.limit is not None:
            known = min(known, config.limit)
        total = None if known is None else max(known - record, 0)
        progress = progress_bar(total=total, desc="tokenizing", unit="doc", disable=not config.show_progress)
        bad_rows_before = self.stats.bad_rows
        records_before = self.stats.records_read
        documents_before = self.stats.documents
        rows_seen = 0
        text_rejections = 0  # bad rows found here rather than by the reader

        def account() -> None:
            # Records read = rows handed over + rows the reader rejected; keeps the bar and stats honest.
            self.stats.bad_rows = bad_rows_before + policy.count
            records = rows_seen + policy.count - text_rejections
            progress.update(records_before + records - self.stats.records_read)
            self.stats.records_read = records_before + records

        pending: list[tuple[Row, str]] = []
        try:
            while True:
                try:
                    try:
                        row = next(rows)
                    except StopIteration:
                        break
                    rows_seen += 1
                    rejected_before = policy.count
                    text = require_text(row.values[config.text_column], config.text_column, row.location, policy)
                    text_rejections += policy.count - rejected_before
                except DataSourceError:
                    # A malformed row, one without text, a damaged part of a file: hand out what was read
                    # before it (the cursor then points at it), then fail.
                    yield from self._flush(pending)
                    raise
                finally:
                    account()
                if text is None:
                    continue
                pending.append((row, text))
                if len(pending) >= config.tokenize_batch_size:
                    yield from self._flush(pending)
                    progress.set_postfix(kept=self.stats.documents, short=self.stats.too_short, bad=self.stats.bad_rows)
            yield from self._flush(pending)
        finally:
            progress.close()
        if cursor == 0 and self.stats.documents == documents_before:
            raise EmptySourceError(
                f"no document of {config.path!r} passed the filters (min_length={config.min_length}): "
                f"{self.stats.model_dump()}"
            )

    def row_source(self, policy: BadRowPolicy | None = None) -> RowSource:
        config = self.config
        return RowSource(config.path, columns=[config.text_column], fmt=config.format, policy=policy,
                         split=config.split)

    def _flush(self, pending: list[tuple[Row, str]]) -> Iterator[TokenizedDocument]:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        heads = [self._head(text) for _, text in batch]
        encoded = self.tokenizer.encode_batch(heads)
        for index, ((_, text), head) in enumerate(zip(batch, heads)):
            # A cut text is trusted only when its tokens overflow the windows: the kept tokens then come from
            # before the cut, and the document is truncated either way. A text of unusually long tokens is
            # encoded whole.
            if len(head) < len(text) and len(encoded[index]) <= self.config.max_length * self.config.max_windows:
                encoded[index] = self.tokenizer.encode(text)
        for (row, text), ids in zip(batch, encoded):
            documents = [] if self._blank(text) else self._finish(row, ids)
            for document in documents:
                self.cursor = document.next_cursor  # a restart goes on after it
                yield document
            self.cursor = (row.index + 1) * self.config.max_windows  # used, or filtered

    def _head(self, text: str) -> str:
        """The text up to the last whitespace (any: an ideographic space too) before max_length x max_windows x
        HEAD_CHARS_PER_TOKEN characters: a document keeps at most max_length x max_windows tokens, and tokenizing
        a multi-megabyte text whole takes some twenty times its size in memory (hundreds of times for one long
        word) for tokens thrown away. Tokenizers split words at whitespace, so the tokens before a cut there are
        those of the whole text. Without whitespace in the limit's second half (text without spaces: Chinese or
        Japanese, minified code), the cut is at the limit: a merge across it changes only tokens near it, some
        HEAD_CHARS_PER_TOKEN times further than the tokens kept, which _flush trusts only when they overflow the
        windows."""
        if self.config.max_length is None:
            return text
        limit = self.config.max_length * self.config.max_windows * HEAD_CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        if isinstance(self.tokenizer, ByteTokenizer):  # each character becomes its own bytes: any cut is exact
            return text[:limit]
        last_space = _LAST_WHITESPACE.search(text, limit // 2, limit)
        return text[:last_space.start() if last_space is not None else limit]

    def _blank(self, text: str) -> bool:
        """Count and drop a blank text (is_blank): its tokens would be padding-like noise, trained on as text.
        An empty text stays a too-short document, as it always was."""
        if text and is_blank(text):
            self.stats.blank += 1
            return True
        return False

    def _finish(self, row: Row, ids: list[int]) -> list[TokenizedDocument]:
        """The documents of one record: its tokens (BOS first) in windows of max_length, at most max_windows
        of them, less those a resumed stream used already. A record shorter than min_length gives none, and a
        last window shorter than min_length is dropped (both counted). Later windows get no BOS of their own:
        they continue the record's text."""
        config = self.config
        bos = [self.tokenizer.bos_id] if config.add_bos and self.tokenizer.bos_id is not None else []
        token_ids = bos + list(ids)
        size = config.max_length
        truncated = size is not None and len(token_ids) > size * config.max_windows
        if truncated:
            # A cut document did not end here, so it gets no EOS.
            token_ids = token_ids[: size * config.max_windows]
            self.stats.truncated += 1
        elif config.add_eos and (size is None or len(token_ids) % size or not token_ids):
            token_ids.append(self.tokenizer.eos_id)  # where the last window has room for it
        if size is None or not token_ids:
            windows = [token_ids]
        else:
            windows = [token_ids[start: start + size] for start in range(0, len(token_ids), size)]
        if len(windows[0]) < config.min_length:
            self.stats.too_short += 1
            return []
        if len(windows[-1]) < config.min_length:
            windows.pop()
            self.stats.short_tails += 1
        if len(windows) > 1:
            self.stats.split += 1
        used = self._windows_used if row.index == self._resume_record else 0
        start = row.index * config.max_windows  # the cursor at this record's position
        documents = []
        for window, tokens in enumerate(windows[used:], start=used):
            last = window == len(windows) - 1
            self.stats.documents += 1
            self.stats.tokens += len(tokens)
            documents.append(TokenizedDocument(
                doc_id=row.doc_id if window == 0 else f"{row.doc_id}#{window}", index=row.index, token_ids=tokens,
                next_cursor=start + config.max_windows if last else start + window + 1,
                truncated=truncated and last, window=window))
        return documents


def iter_documents(config: DataConfig, tokenizer: Tokenizer, cursor: int = 0) -> Iterator[TokenizedDocument]:
    """Shorthand for `DocumentStream(config, tokenizer).iter_from(cursor)`."""
    return DocumentStream(config, tokenizer).iter_from(cursor)
