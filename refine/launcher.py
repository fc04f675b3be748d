"""The `refine` command's entry point (pyproject.toml's [project.scripts]). The command line's modules take a second
or two to load (torch): a Ctrl-C or SIGTERM meanwhile ends the command as one while it runs does, with exit code 130
and one line, not a traceback. A command that had to abandon a client (a local Ray a signal stopped) ends its process
without the interpreter's finalization (refine.runtime.command_exit)."""

from __future__ import annotations

import sys

from refine.runtime import command_exit, sigterm_as_ctrl_c


def main() -> int:
    with sigterm_as_ctrl_c():
        try:
            from refine.cli import main as command_line
        except KeyboardInterrupt:
            print("refine: interrupted", file=sys.stderr)
            return 130
    return command_exit(command_line())
