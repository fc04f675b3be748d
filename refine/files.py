"""Files a run writes whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` whole or not at all: a run killed mid-write leaves the previous file, never half of one."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename, so that a machine crash cannot leave it empty
    os.replace(temp, path)


def file_name_part(text: str) -> str:
    """`text` as part of a file name: letters, digits, "-", "_" and "." kept, anything else "_" (so never "~",
    which the callers put after such a part: one name's part is then never a prefix of another's match)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
