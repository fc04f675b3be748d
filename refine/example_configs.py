"""The example run configs, shipped inside the package (refine/configs/*.yaml; a checkout's configs/ links there), and
`refine configs DIR`, which copies them out: an installed package has no checkout beside it to take them from."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; 3.10 has the same class in importlib.abc
    from importlib.resources.abc import Traversable

# Where the commands README names look for them, relative to the working directory (`refine train configs/demo.yaml`).
DEFAULT_DIR = "configs"
COMMAND = "refine configs"


def shipped_examples() -> list[Traversable]:
    """The example YAML files in the installed package, by name."""
    return sorted((entry for entry in (files("refine") / "configs").iterdir() if entry.name.endswith(".yaml")),
                  key=lambda entry: entry.name)


def is_shipped_example(name: str) -> bool:
    return any(example.name == name for example in shipped_examples())


@dataclass
class CopyReport:
    written: list[Path] = field(default_factory=list)
    # Files in DIR that are the shipped ones themselves (a checkout's configs/ is a link to them): nothing to copy.
    already_shipped: list[Path] = field(default_factory=list)


def _is_the_shipped_file(target: Path, example: Traversable) -> bool:
    return isinstance(example, Path) and target.exists() and target.samefile(example)


def copy_examples(directory: str | Path = DEFAULT_DIR, overwrite: bool = False) -> CopyReport:
    """Copy every shipped example into `directory` (made if missing). An existing file there is refused, naming it,
    before anything is written, unless `overwrite`: it may hold the user's own edits."""
    if str(directory) == "":  # Path("") is the working directory, never what an empty "$DIR" meant
        raise ValueError(f"the directory is empty (''): name one, or leave it out for ./{DEFAULT_DIR}")
    directory = Path(directory)
    if (directory.exists() or directory.is_symlink()) and not directory.is_dir():
        raise ValueError(f"{directory} is not a directory (a file, or a link to nothing): give a directory to write "
                         f"the examples into")
    report = CopyReport()
    pending: list[tuple[Traversable, Path]] = []
    edited: list[Path] = []
    for example in shipped_examples():
        target = directory / example.name
        if target.is_dir():  # not even --force replaces a folder
            raise ValueError(f"{target} is a directory: move it away, or give another directory")
        if _is_the_shipped_file(target, example):
            report.already_shipped.append(target)
        elif target.exists() and not overwrite:
            edited.append(target)
        else:
            pending.append((example, target))
    if edited:  # every one named: a user moving them away learns of all at once
        names = ", ".join(str(target) for target in edited)
        raise FileExistsError(f"{names} {'exists' if len(edited) == 1 else 'exist'}: `{COMMAND}` leaves existing "
                              f"files alone (they may hold your edits); pass --force to overwrite them, or give "
                              f"another directory")
    directory.mkdir(parents=True, exist_ok=True)
    for example, target in pending:
        # "x": a file made since the check above is refused too. Bytes, not shutil.copy: the new file takes the
        # user's umask, not a read-only mode the package's install may have.
        with open(target, "wb" if overwrite else "xb") as handle:
            handle.write(example.read_bytes())
        report.written.append(target)
    return report
