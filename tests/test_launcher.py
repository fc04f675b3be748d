"""The `refine` command's entry point: a Ctrl-C or SIGTERM while the command line loads is one line and exit code
130, as during the command, not a traceback."""

import os
import signal
import sys
from importlib.abc import MetaPathFinder

import pytest

from refine import launcher


class _StopWhileLoading(MetaPathFinder):
    """Stops the process as the command line's module is imported: by Ctrl-C, or by SIGTERM sent to itself."""

    def __init__(self, how: str) -> None:
        self.how = how

    def find_spec(self, name, path=None, target=None):
        if name == "refine.cli":
            if self.how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return None


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stop_while_the_command_line_loads_is_one_line(monkeypatch, capsys, ctrl_c, how):
    monkeypatch.delitem(sys.modules, "refine.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_StopWhileLoading(how), *sys.meta_path])
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a shell starts it (an ignored one stays ignored)
    try:
        assert launcher.main() == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "refine: interrupted\n"


def test_the_command_runs_once_loaded(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["refine", "model", "inspect", str(tmp_path / "nowhere")])
    assert launcher.main() == 2
    assert capsys.readouterr().err.startswith("refine: error: ")
