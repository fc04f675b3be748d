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
