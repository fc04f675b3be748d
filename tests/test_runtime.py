"""refine.runtime: the allocator settings every entry point applies, and their switch; SIGTERM as Ctrl-C; stage
timing; progress and notes that a lost stderr ends without ending the run."""

import errno
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import refine.runtime as runtime
from refine.runtime import (
    ProgressStream, StageTimes, command_exit, note, progress_bar, sigterm_as_ctrl_c, sigterm_received, timed_stage,
)

PROBE = "from refine.runtime import tune_allocator; print(tune_allocator(), tune_allocator())"


def _probe(**env: str) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning applies to glibc Linux only")
def test_allocator_tuning_applies_once_on_glibc():
    assert _probe(REFINE_MALLOC_TUNING="1") == "True True"


def test_allocator_tuning_can_be_switched_off():
    assert _probe(REFINE_MALLOC_TUNING="0") == "False False"


def test_stage_times_add_up_per_stage_and_survive_an_error():
    times = StageTimes("cpu")
    for _ in range(2):
        with times.stage("work"):
            time.sleep(0.01)  # a sleep never ends early, so the sum is at least 0.02 s
    with pytest.raises(RuntimeError), times.stage("failing"):
        raise RuntimeError("the stage's error propagates")
    with timed_stage(None, "untimed"):  # no timer: nothing recorded anywhere
        pass
    assert set(times.seconds) == {"work", "failing"}
    assert times.seconds["work"] >= 0.02 and times.seconds["failing"] >= 0
    assert times.stats() == {"work_seconds": times.seconds["work"], "failing_seconds": times.seconds["failing"]}


def test_sigterm_raises_ctrl_c_inside_and_the_handler_before_is_put_back():
    def before(signum, frame):
        raise AssertionError("the handler before ran inside")

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigterm_as_ctrl_c():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs at the next bytecode; never slept through
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_is_remembered_until_the_next_opening():
    """What tears down a local Ray asks whether SIGTERM (which reaches Ray's processes, unlike Ctrl-C) stopped the run."""
    with sigterm_as_ctrl_c():
        assert not sigterm_received()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert sigterm_received()
    assert sigterm_received()  # after the stop: what tears down runs then
    with sigterm_as_ctrl_c():  # the next command or run of this process
        assert not sigterm_received()


def test_a_command_that_abandoned_a_client_ends_with_its_code_and_its_output_flushed():
    assert command_exit(3) == 3  # nothing asked: the interpreter ends as usual
    script = (
        "import logging, sys\n"
        "from refine.runtime import command_exit, end_without_finalizing\n"
        "import atexit; atexit.register(lambda: print('finalized'))\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "print('written', end='')\n"
        "logging.getLogger('x').warning('logged')\n"
        "end_without_finalizing()\n"
        "sys.exit(command_exit(130))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (130, "written"), out.stderr
    assert "logged" in out.stderr


def test_an_ignored_sigterm_stays_ignored_and_other_threads_change_nothing():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with sigterm_as_ctrl_c():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen: list[object] = []

    def off_the_main_thread() -> None:
        with sigterm_as_ctrl_c():  # signal.signal would raise ValueError here
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=off_the_main_thread)
    thread.start()
    thread.join()
    assert seen == [previous]


class FailingStream(io.StringIO):
    """A stderr whose writes work `works` times, then raise `error` (a reader gone, a full disk)."""

    def __init__(self, error: OSError, works: int = 1):
        super().__init__()
        self.error, self.works, self.calls = error, works, 0

    def write(self, text: str) -> int:
        self.calls += 1
        if self.calls > self.works:
            raise self.error
        return super().write(text)


@pytest.fixture
def progress(monkeypatch) -> ProgressStream:
    """A fresh PROGRESS: losing it here must not silence the other tests' notes."""
    stream = ProgressStream()
    monkeypatch.setattr(runtime, "PROGRESS", stream)
    return stream


def test_notes_and_progress_bars_reach_stderr(progress, capsys):
    with progress_bar(total=2, desc="steps") as bar:
        bar.update(1)
        note("a note")
        bar.update(1)
    err = capsys.readouterr().err
    assert "a note\n" in err and "steps: 100%" in err and not progress.lost


@pytest.mark.parametrize("error", [BrokenPipeError(errno.EPIPE, "Broken pipe"),
                                   OSError(errno.ENOSPC, "No space left on device")], ids=["pipe", "full"])
def test_a_stderr_that_fails_ends_progress_and_notes_without_raising(progress, monkeypatch, error):
    stderr = FailingStream(error)
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress_bar(total=3, desc="steps") as bar:
        for _ in range(3):
            bar.update(1)
            note("a note")
    assert progress.lost and stderr.calls == 2  # the first write, then the failing one: none after it
    assert stderr.getvalue().startswith("\rsteps:")


def test_a_closed_stderr_ends_progress_and_notes_without_raising(progress, monkeypatch):
    stderr = io.StringIO()
    stderr.close()  # its writes raise ValueError
    monkeypatch.setattr(sys, "stderr", stderr)
    note("a note")
    assert progress.lost


def test_no_stderr_at_all_ends_progress_and_notes_without_raising(progress, monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)  # what `2>&-` leaves Python
    with progress_bar(total=2, desc="steps") as bar:
        bar.update(2)
        note("a note")
    assert progress.lost
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    note("lost for good")  # a stderr that comes back is not written to: the bars drawn are gone
    assert sys.stderr.getvalue() == ""
