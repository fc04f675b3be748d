"""Whether a service run's actors run the driver's code: a digest of the project's own sources, compared.

A driver started outside `ray job submit --working-dir .` imports its own checkout, while its actors import the
project as the cluster's nodes have it: two versions of the code, which can disagree on the messages between roles,
the algorithm or the checkpoint format without any error. The driver passes its `SourceStamp` to every actor, and an
actor whose own sources differ refuses to start (`check_sources`), naming both copies and the remedy.

The digest covers the .py files of the packages the project ships (pyproject.toml's
`[tool.setuptools.packages.find]`), as setuptools finds them: folders with an `__init__.py`. Bytecode caches and
other files are left out: they differ between copies of one version (a checkout and its `pip install .`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict

__all__ = ["PROJECT_PACKAGES", "SourceMismatch", "SourceStamp", "check_sources", "own_stamp", "package_folders",
           "source_digest"]

# The project's top-level packages, which its actors import (services/, learner/, ... are top-level by design).
PROJECT_PACKAGES = ("refine", "refine_vllm", "services", "learner", "rollout_workers", "reward")


class SourceMismatch(ValueError):
    """An actor imports other sources of the project than its driver (a setup error: a resume would fail the same)."""


class SourceStamp(BaseModel):
    """Which sources of the project a process imports: their digest, and where they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    digest: str  # sha256 hex of `source_digest`
    folder: str  # where the packages were imported from (several, comma-separated, if they are not side by side)
    host: str


def package_folders(names: Iterable[str] = PROJECT_PACKAGES) -> dict[str, Path | None]:
    """The folder each package is (or would be) imported from in this process, None where it is not importable.
    Looked up as an import would (sys.path, installed finders), without importing anything."""
    folders: dict[str, Path | None] = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        locations = None if spec is None else spec.submodule_search_locations
        folders[name] = Path(next(iter(locations))).resolve() if locations else None
    return folders


def _source_files(package: Path) -> Iterator[Path]:
    """The .py files of `package` and of its subpackages (folders with an `__init__.py`, as setuptools finds them)."""
    for path in package.iterdir():
        if path.is_file() and path.suffix == ".py":
            yield path
        elif path.is_dir() and (path / "__init__.py").is_file():
            yield from _source_files(path)


def source_digest(folders: dict[str, Path | None]) -> str:
    """sha256 over the sorted (path relative to the package's parent, bytes) of every .py file of the packages
    `folders` names; a package that is missing counts as such."""
    entries: list[tuple[str, Path | None]] = []
    for name, folder in folders.items():
        if folder is None:
            entries.append((f"{name}/ (missing)", None))
            continue
        entries += [(path.relative_to(folder.parent).as_posix(), path) for path in _source_files(folder)]
    digest = hashlib.sha256()
    for relative, path in sorted(entries, key=lambda entry: entry[0]):
        data = b"" if path is None else path.read_bytes()
        # Lengths keep the (path, bytes) pairs apart: no two file sets hash the same stream.
        digest.update(f"{len(relative.encode())}:{relative}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


@functools.cache
def own_stamp() -> SourceStamp:
    """This process's sources, hashed once: they do not change while it runs (a module edited meanwhile is not
    imported again)."""
    folders = package_folders()
    parents = sorted({str(folder.parent) for folder in folders.values() if folder is not None})
    return SourceStamp(digest=source_digest(folders), folder=", ".join(parents) or "(none)",
                       host=socket.gethostname())


def check_sources(expected: str | None) -> None:
    """Refuse to go on when this process's sources are not those of `expected` (the driver's SourceStamp, as JSON);
    None: nothing to compare with (a role made outside a service run, by a notebook or a test)."""
    if expected is None:
        return
    driver, here = SourceStamp.model_validate_json(expected), own_stamp()
    if here.digest == driver.digest:
        return
    raise SourceMismatch(
        f"this actor imports the project from {here.host}:{here.folder} (sources {here.digest[:12]}), but the run's "
        f"driver from {driver.host}:{driver.folder} (sources {driver.digest[:12]}): two versions of the code, which "
        f"can disagree on the messages between roles, the algorithm or the checkpoint format. Submit the run with "
        f"`ray job submit --working-dir .` from the driver's checkout (its actors then import that copy), or install "
        f"the same version of the project on every node (a local Ray's actors import from the driver's working "
        f"directory first: start the run from elsewhere)")
