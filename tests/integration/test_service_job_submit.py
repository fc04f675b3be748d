"""`ray job submit -- refine train ...` against a real Ray head started for this test.

The head runs with `--block` in its own process group on free ports and a private temp dir; the
test ends it by signalling that one process (never `ray stop`, which would stop every Ray on the
machine). Token authentication uses a token made for this test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_helpers import SERVICE_TINY, step_rows, tiny_overrides

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CHECKOUT = Path(__file__).resolve().parents[2]


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are picked (one at a time, the
    kernel may hand the same port out twice, and Ray refuses a port given to two of its components)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def ray_head() -> Iterator[tuple[str, dict[str, str], str]]:
    """(dashboard URL, environment for Ray commands, the RAY_TMPDIR whose ray/ folder is its temp dir) of a one-node
    Ray cluster with a dashboard."""
    temp_root = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    temp_dir = os.path.join(temp_root, "ray")  # as RAY_TMPDIR=temp_root lays it out (/tmp/ray by default)
    os.mkdir(temp_dir)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    # Every port Ray would otherwise pick itself is named too, so none of them lands on one of these.
    names = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
             "object-manager-port")
    ports = dict(zip(names, _free_ports(len(names))))
    command = [str(BIN / "ray"), "start", "--head", "--block", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--num-cpus", "4", "--object-store-memory", str(100 * 1024 * 1024),
               "--temp-dir", temp_dir, "--disable-usage-stats"]
    for name, port in ports.items():
        command += [f"--{name}", str(port)]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=1).read()
                break
            except urllib.error.HTTPError:
                break  # it answers (asking for the token): it is up
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, env, temp_root
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its session: raylet, GCS and the dashboard, not just `ray start`
            head.wait()
        log.close()
        shutil.rmtree(temp_root, ignore_errors=True)


def test_ray_job_submit_runs_refine_train(ray_head, redis_url: str, tmp_path: Path) -> None:
    url, env, _ = ray_head
    steps = 3
    entrypoint = ["refine", "train", str(SERVICE_TINY), "--no-progress", "--redis-url", redis_url,
                  "--set", f"train.steps={steps}"]
    for item in tiny_overrides(tmp_path):
        entrypoint += ["--set", item]
    # As README submits it: the checkout uploaded as the job's working directory, where its actors import from.
    result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(CHECKOUT),
                             "--", *entrypoint], env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    rows = step_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert (tmp_path / "run" / "checkpoints" / "latest" / "learner_state.json").exists()


def test_a_run_without_a_ray_address_starts_its_own_ray_beside_another_users_cluster(
    ray_head, redis_url: str, tmp_path: Path
) -> None:
    """`ray start --head` leaves its address where a plain ray.init() looks (RAY_TMPDIR, /tmp/ray by default): a
    run meant to start a local Ray joined that cluster instead, which refused the run's num_cpus."""
    _, env, temp_root = ray_head
    env = dict(env, RAY_TMPDIR=temp_root)  # where that cluster's address lies, as /tmp/ray holds another user's
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_AUTH_TOKEN", None)
    command = [str(BIN / "refine"), "train", str(SERVICE_TINY), "--no-progress", "--redis-url", redis_url,
               "--set", "train.steps=2"]
    for item in tiny_overrides(tmp_path):
        command += ["--set", item]
    for extra in ([], ["--ray-address", "local"]):
        result = subprocess.run(command + extra, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "num_cpus and num_gpus must not be provided" not in result.stderr
        assert [row["step"] for row in step_rows(tmp_path / "run")] == [1, 2]
