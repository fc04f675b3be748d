"""Finding a source's data files, and telling its format from their extensions or from what a folder holds."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from refine.data.sources import DataSourceError, EmptySourceError, SourceFormat

logger = logging.getLogger(__name__)

_EXTENSIONS: dict[str, SourceFormat] = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".7z", ".br", ".snappy")
# Files `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the folder's top level.
_HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


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
            f"expected one of {sorted(_EXTENSIONS)} or set data.format"
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
        raise DataSourceError(f"data folder {str(path)!r} mixes formats {found}: set data.format")
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
