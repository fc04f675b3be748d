"""One run at a time in a run directory (refine.run_lock): refused while held, free once the holder ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_loop import _config

from refine.cli import main
from refine.loop import train
from refine.run_lock import LOCK_NAME, RunDirectoryInUse, run_directory_lock

REPO = Path(__file__).resolve().parents[1]


def test_a_held_directory_is_refused_naming_its_holder_and_free_again_after(tmp_path):
    run = tmp_path / "run"
    with run_directory_lock(run, "refine train --local"):
        assert (run / LOCK_NAME).is_file()
        with pytest.raises(RunDirectoryInUse, match=rf"^train.out_dir='{run}' is in use by another run \(`refine "
                                                     rf"train --local`, pid {os.getpid()} on .*, started .*\): .*"
                                                     rf"give this run another train.out_dir$"):
            with run_directory_lock(run, "refine posttrain"):
                pass
    assert not run.exists()  # made for the run, left empty: removed, as a run that never started leaves nothing
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with run_directory_lock(run, "refine posttrain"):
        pass
    assert sorted(path.name for path in run.iterdir()) == ["metrics.jsonl"]  # the lock file goes, the run's stay


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from refine.run_lock import run_directory_lock\n"
         "with run_directory_lock(sys.argv[1], 'refine train (service)'):\n"
         "    print('held', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryInUse, match=rf"`refine train \(service\)`, pid {holder.pid} on"):
            with run_directory_lock(run, "refine train --local"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_NAME).exists()  # a SIGKILL runs no clean-up; the kernel released its lock all the same
    with run_directory_lock(run, "refine train --local"):
        pass


def test_a_second_run_or_a_resume_of_a_live_run_is_refused_before_it_writes(tmp_path, capsys):
    """Two runs in one train.out_dir both exited 0 with their metrics.jsonl rows interleaved and each other's
    checkpoints removed; a --resume of a run still going lost the rows the original wrote meanwhile."""
    config = _config(tmp_path / "run", "ntp", steps=1)
    train(config, progress=False)
    before = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    with run_directory_lock(tmp_path / "run", "refine train --local"):  # the run going on
        with pytest.raises(RunDirectoryInUse, match="is in use by another run"):
            train(config, progress=False)
        with pytest.raises(RunDirectoryInUse, match="is in use by another run"):
            train(config.model_copy(update={"train": config.train.model_copy(update={"steps": 2})}), resume=True,
                  progress=False)
        assert main(["train", str(tmp_path / "run" / "config.yaml"), "--local", "--resume", "--no-progress",
                     "--set", "train.steps=2"]) == 2
        assert "is in use by another run" in capsys.readouterr().err
        after = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()
                 and path.name != LOCK_NAME}
        assert after == before
    train(config.model_copy(update={"train": config.train.model_copy(update={"steps": 2})}), resume=True,
          progress=False)
