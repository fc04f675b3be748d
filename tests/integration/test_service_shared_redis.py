"""Runs that share one Redis: the same run started twice by mistake is refused while the first goes on, which
finishes untouched; a run stopped as `timeout`, systemd or Slurm stop it leaves no key behind (real Redis, a real
local Ray per run, `refine train` as a user runs it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.redis_server import connect

from service_helpers import SERVICE_TINY, step_rows

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def test_the_same_run_started_twice_is_refused_and_the_first_finishes(redis_url: str, tmp_path: Path) -> None:
    steps = 30
    out_dir = tmp_path / "run"
    command = [str(BIN / "refine"), "train", str(SERVICE_TINY), "--no-progress", "--redis-url", redis_url,
               "--set", f"train.steps={steps}", "--set", f"train.out_dir={out_dir}",
               "--set", f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"]  # the namespace: from out_dir
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not ((out_dir / "metrics.jsonl").exists() and step_rows(out_dir)):
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the first run took no step"
                time.sleep(0.2)
            second = subprocess.run(command, capture_output=True, text=True, timeout=180)
            assert first.poll() is None, "the first run ended before the second was refused: raise steps"
            assert second.returncode == 2, second.stderr[-3000:]
            assert f"is in use by a run that is going on: train.out_dir='{out_dir}', its driver pid {first.pid}" \
                in second.stderr, second.stderr[-3000:]
            assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            first.kill()
            first.wait()
    assert [row["step"] for row in step_rows(out_dir)] == list(range(1, steps + 1))
    assert "Redis namespace and Prometheus run label: refine-" in (tmp_path / "first.log").read_text()


@contextmanager
def service_run_with_steps(redis_url: str, tmp_path: Path, rows: int) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A 400-step `refine train` of the tiny service config in a session of its own, once its metrics.jsonl holds
    `rows` step rows: the driver's process and its log. Killed with the Ray it started, if still going, after."""
    out_dir = tmp_path / "run"
    command = [str(BIN / "refine"), "train", str(SERVICE_TINY), "--no-progress", "--redis-url", redis_url,
               "--set", "train.steps=400", "--set", f"train.out_dir={out_dir}",
               "--set", f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"]
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not ((out_dir / "metrics.jsonl").exists() and len(step_rows(out_dir)) >= rows):
                assert run.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"the run took fewer than {rows} steps"
                time.sleep(0.2)
            yield run, log_path
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()


def test_a_sigterm_to_the_whole_process_group_stops_the_run_cleanly_and_leaves_no_key(redis_url: str,
                                                                                     tmp_path: Path) -> None:
    """`timeout`, `systemctl stop` and `scancel` signal the driver's whole process group, its local Ray with it:
    removing the run's placement group then waited 60 s for Ray's dead GCS and ended the process (exit 1), leaving
    the run's keys in the shared Redis, two copies of the weights among them."""
    with service_run_with_steps(redis_url, tmp_path, rows=1) as (run, log_path):
        os.killpg(run.pid, signal.SIGTERM)
        code = run.wait(timeout=45)
    text = log_path.read_text()
    assert code == 130 and "refine: interrupted" in text, text[-3000:]
    namespace = re.search(r"Redis namespace and Prometheus run label: (\S+)", text).group(1)
    client = connect(redis_url)
    try:
        assert list(client.scan_iter(match=f"{namespace}:*")) == []
    finally:
        client.close()


def test_a_driver_killed_without_cleaning_up_leaves_only_keys_that_expire(redis_url: str, tmp_path: Path) -> None:
    """SIGKILL (a forced `ray job stop`, the out-of-memory killer, a node lost) runs no cleanup: the run's streams and
    its two weight versions stayed in the shared Redis for good, until the same namespace ran again."""
    with service_run_with_steps(redis_url, tmp_path, rows=2) as (run, log_path):
        os.killpg(run.pid, signal.SIGKILL)  # the driver and the local Ray it started
        run.wait()
    namespace = re.search(r"Redis namespace and Prometheus run label: (\S+)", log_path.read_text()).group(1)
    client = connect(redis_url)
    try:
        ttls = {name.decode(): client.pttl(name) for name in client.scan_iter(match=f"{namespace}:*")}
        claim = ttls.pop(f"{namespace}:claim")
        assert 0 < claim <= 90_000  # its own TTL: max(60, 4 x service.heartbeat_timeout_s=10) + 30 s
        assert any(":weights:blob:" in name for name in ttls) and any(":stream:" in name for name in ttls), ttls
        assert all(0 < ttl <= 3_600_000 for ttl in ttls.values()), ttls  # service.key_ttl_s: an hour by default
    finally:
        for name in client.scan_iter(match=f"{namespace}:*"):
            client.delete(name)
        client.close()
