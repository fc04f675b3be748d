"""Records of a source in any format: parquet, JSON lines, plain-text folders, `datasets.save_to_disk` folders.

`RowSource` picks the format's reader and reads records (dicts of the asked columns) with one `BadRowPolicy`
(refine.data.sources): a malformed or undecodable record raises `BadRowError` naming the file and row, or, with
`skip_bad_rows`, is logged with its location, counted and skipped. Never silently.

Every record has an index in the whole source (files in sorted order, bad and filtered records included).
Records are read in that order, or, with a seed, in a random order drawn from it (every record once; see
`RowSource.shuffled_rows`); a record's position in the order read is its `Row.index`.
"""

from __future__ import annotations

import bisect
import codecs
import json
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from refine.data.formats import detect_format, source_files
from refine.data.sources import BadRowPolicy, DataSourceError, EmptySourceError, MissingColumnError, SourceFormat


@dataclass(slots=True)
class Row:
    index: int  # the record's position in the order read: its index in the source, unless shuffled
    location: str  # "file, row N" or "file, line N": for error messages
    doc_id: str
    values: dict[str, Any] = field(default_factory=dict)
    rejected: bool = False  # a skipping policy already logged and counted it


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
            record = json.loads(text, object_pairs_hook=_json_object)
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
        twice = [column for column in getattr(record, "repeated", ()) if column in wanted]
        if twice:  # which of the values was meant cannot be told; a repeated key the run does not read is harmless
            self.policy.reject(location, f"column {twice[0]!r} given more than once in the row (JSON would keep the "
                                         f"last silently)")
            return None
        return {column: record[column] for column in wanted}


class _RepeatedKeys(dict[str, Any]):
    """A parsed JSON object that gives a key more than once (a dict keeps the last value): `repeated` names those."""

    repeated: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: the object as a dict, marked when it repeats a key (as the reward service's
    reward.safe_json marks them)."""
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    marked = _RepeatedKeys(value)
    seen: set[str] = set()
    marked.repeated = [key for key, _ in pairs if key in seen or seen.add(key)]
    return marked


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
            if not location.is_dir():  # datasets' own error ("neither a Dataset directory nor ...") names no format
                raise DataSourceError(f"format 'hf' reads a folder written by datasets' save_to_disk, but data path "
                                      f"{str(path)!r} is a file: give its format (or auto), or the folder")
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
