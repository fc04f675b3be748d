"""Writing run files whole or not at all."""

import pytest

from refine.files import write_atomically


def test_a_write_that_fails_keeps_the_earlier_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    write_atomically(path, "earlier")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(path, "a lone surrogate \ud800 cannot be encoded")
    assert path.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_atomically(path, "later")
    assert path.read_text() == "later"
