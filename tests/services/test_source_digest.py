"""The digest of the project's sources that a service run's driver and actors compare (services/source_digest.py)."""

from __future__ import annotations

import shutil
import socket
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

from services.source_digest import (
    PROJECT_PACKAGES, SourceMismatch, SourceStamp, check_sources, own_stamp, package_folders, source_digest,
)

CHECKOUT = Path(__file__).resolve().parents[2]


def _copy(destination: Path) -> dict[str, Path | None]:
    """The checkout's packages copied to `destination`, without bytecode caches: the folders to hash."""
    for name in PROJECT_PACKAGES:
        shutil.copytree(CHECKOUT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    return {name: destination / name for name in PROJECT_PACKAGES}


def test_the_digest_covers_every_package_the_project_ships() -> None:
    include = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = {name.split(".")[0] for name in find_packages(CHECKOUT, include=include["include"])}
    assert shipped == set(PROJECT_PACKAGES)


def test_a_copy_of_the_sources_has_the_checkouts_digest_and_it_is_stable(tmp_path: Path) -> None:
    checkout = {name: CHECKOUT / name for name in PROJECT_PACKAGES}
    assert source_digest(checkout) == source_digest(checkout) == source_digest(_copy(tmp_path))
    assert package_folders() == checkout  # this process imports the checkout
    assert own_stamp() == SourceStamp(digest=source_digest(checkout), folder=str(CHECKOUT), host=socket.gethostname())
    assert own_stamp() is own_stamp()  # hashed once per process


def test_a_changed_added_removed_or_moved_source_file_changes_the_digest(tmp_path: Path) -> None:
    folders = _copy(tmp_path)
    original = source_digest(folders)
    messages = tmp_path / "services" / "messages.py"
    text = messages.read_text()
    messages.write_text(text + "# one more line\n")
    assert source_digest(folders) != original
    messages.write_text(text)
    assert source_digest(folders) == original
    (tmp_path / "refine" / "models" / "extra.py").write_text("")  # a module in a subpackage
    assert source_digest(folders) != original
    (tmp_path / "refine" / "models" / "extra.py").unlink()
    messages.rename(tmp_path / "learner" / "messages.py")  # the same bytes, another module
    assert source_digest(folders) != original
    (tmp_path / "learner" / "messages.py").rename(messages)
    assert source_digest(folders) == original
    shutil.rmtree(tmp_path / "refine_vllm")  # a package missing
    assert source_digest(folders | {"refine_vllm": None}) != original


def test_files_an_install_does_not_ship_leave_the_digest_alone(tmp_path: Path) -> None:
    """Bytecode caches, other files and folders that are no package (setuptools installs none of them) differ
    between a checkout and its `pip install .`, or between two nodes of one version."""
    folders = _copy(tmp_path)
    original = source_digest(folders)
    cache = tmp_path / "services" / "__pycache__"
    cache.mkdir()
    (cache / "messages.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (cache / "stray.py").write_text("x = 1\n")  # not a package: never imported from there
    (tmp_path / "refine" / "notes").mkdir()
    (tmp_path / "refine" / "notes" / "scratch.py").write_text("x = 2\n")
    (tmp_path / "learner" / "learner.pyc").write_bytes(b"\x00")
    (tmp_path / "reward" / "README.md").write_text("notes\n")
    (tmp_path / "unrelated.py").write_text("x = 3\n")  # beside the packages
    assert source_digest(folders) == original


def test_an_actor_with_other_sources_refuses_naming_both_copies_and_the_remedy() -> None:
    ours = own_stamp()
    check_sources(ours.model_dump_json())  # the driver's own sources
    check_sources(None)  # a role made outside a service run: nothing to compare
    driver = SourceStamp(digest="0" * 64, folder="/home/me/refine", host="laptop")
    with pytest.raises(SourceMismatch) as info:
        check_sources(driver.model_dump_json())
    assert str(info.value) == (
        f"this actor imports the project from {ours.host}:{CHECKOUT} (sources {ours.digest[:12]}), but the run's "
        f"driver from laptop:/home/me/refine (sources 000000000000): two versions of the code, which can disagree on "
        f"the messages between roles, the algorithm or the checkpoint format. Submit the run with `ray job submit "
        f"--working-dir .` from the driver's checkout (its actors then import that copy), or install the same version "
        f"of the project on every node (a local Ray's actors import from the driver's working directory first: "
        f"start the run from elsewhere)")
    assert isinstance(info.value, ValueError)  # a setup error: no resume is advised (it would fail the same way)
