"""Writing run files whole or not at all."""

import errno
import os

import pytest

from refine.files import file_system_error, write_atomically


def test_a_write_that_fails_keeps_the_earlier_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    write_atomically(path, "earlier")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(path, "a lone surrogate \ud800 cannot be encoded")
    assert path.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_atomically(path, "later")
    assert path.read_text() == "later"


def test_a_write_the_disk_refuses_names_the_file_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    """A full disk failed write() or fsync() with a bare "[Errno 28] No space left on device", naming no file."""
    path = tmp_path / "config.yaml"
    write_atomically(path, "earlier")

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=f"^\\[Errno 28\\] No space left on device: '{path}'$") as failure:
        write_atomically(path, "later")
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(path)
    assert path.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_the_file_system_error_behind_a_failed_torch_or_safetensors_save_is_found():
    try:
        try:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as torch_error:
        assert file_system_error(torch_error).errno == errno.EFBIG
    found = file_system_error(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert (found.errno, found.strerror) == (errno.ENOSPC, "No space left on device")
    assert file_system_error(RuntimeError("CUDA out of memory")) is None


@pytest.mark.parametrize("victim_exists", [True, False])
def test_a_link_planted_at_the_old_temporary_name_is_not_written_through(tmp_path, victim_exists):
    """The temporary file was always ".<name>.tmp", opened with open(..., "w"): in a shared directory (the metrics
    discovery one) another user's link there made the run overwrite (or create) whatever file it pointed at, and
    the rename then put that link in the file's place."""
    victim = tmp_path / "victim"
    if victim_exists:
        victim.write_text("the victim's own")
    shared = tmp_path / "shared"
    shared.mkdir()
    path = shared / "learner.json"
    planted = shared / ".learner.json.tmp"
    planted.symlink_to(victim)
    write_atomically(path, "announced")
    assert (victim.read_text() == "the victim's own") if victim_exists else not victim.exists()
    assert not path.is_symlink() and path.read_text() == "announced"
    assert planted.is_symlink() and planted.readlink() == victim  # left as planted: neither followed nor renamed
    assert sorted(p.name for p in shared.iterdir()) == [".learner.json.tmp", "learner.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_a_written_file_has_the_mode_open_gives_a_new_file(tmp_path, umask):
    """0666 less the umask, as open(..., "w") made it: a discovery file stays readable by a Prometheus running as
    another user (a temporary file of tempfile.mkstemp would make it 0600), and a replaced file takes it too."""
    path = tmp_path / "learner.json"
    previous = os.umask(umask)
    try:
        write_atomically(path, "first")
        assert path.stat().st_mode & 0o7777 == 0o666 & ~umask
        path.chmod(0o600)
        write_atomically(path, "second")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o7777 == 0o666 & ~umask and path.read_text() == "second"


def test_a_long_name_still_gets_a_temporary_file(tmp_path):
    path = tmp_path / ("é" * 127)  # 254 bytes: the longest name a file system takes, near enough
    write_atomically(path, "whole")
    assert path.read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
