"""Configs, run-directory readers and checks shared by the service tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from refine.config import RunConfig, load_config
from refine.data.stream import DataPosition, document_batches
from refine.tokenizer import load_tokenizer
from services.orchestrator import run

REPO = Path(__file__).resolve().parents[2]
SERVICE_TINY = REPO / "configs" / "service_tiny.yaml"
BIN = Path(sys.executable).parent


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Run directory, metrics discovery and Redis namespace private to one test."""
    return [
        f"train.out_dir={tmp_path / 'run'}",
        f"service.metrics_discovery_dir={tmp_path / 'prometheus'}",
        f"service.namespace=test-{uuid.uuid4().hex[:10]}",
    ]


def tiny_config(tmp_path: Path, *overrides: str) -> RunConfig:
    """configs/service_tiny.yaml for one test, with extra `section.field=value` overrides."""
    return load_config(SERVICE_TINY, [*tiny_overrides(tmp_path), *overrides])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl: one row per optimizer step."""
    return _jsonl(run_dir / "metrics.jsonl")


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    """events.jsonl rows (dropped batches, restarted roles), of one kind if given."""
    return [row for row in _jsonl(run_dir / "events.jsonl") if kind is None or row["event"] == kind]


def run_in_background(config: RunConfig, **kwargs) -> tuple[threading.Thread, dict]:
    """`run(config)` on a thread; the dict gets "stats" or "error"."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["stats"] = run(config, progress=False, **kwargs)
        except BaseException as exc:  # reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="orchestrator")
    thread.start()
    return thread, outcome


def stream_positions(config: RunConfig, count: int) -> list[tuple[int, int]]:
    """(pass, cursor) of the first `count` batches of the run's data stream, in order."""
    position = DataPosition(epoch=0, cursor=-1)
    batches = document_batches(config, load_tokenizer(config.tokenizer))
    positions = []
    for _ in range(count):
        batch = next(batches)
        positions.append((position.advance(batch.cursor, batch.cursors), batch.cursor))  # as the orchestrator does
    return positions


def assert_every_batch_trained_once(rows: list[dict], config: RunConfig) -> None:
    """Steps 1..steps, each on a different rollout batch, on the data stream's batches in order:
    none skipped, none repeated."""
    steps = config.train.steps
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    ids = [row["rollout_batch_id"] for row in rows]
    assert len(set(ids)) == len(ids) == steps
    assert [(row["data_epoch"], row["cursor"]) for row in rows] == stream_positions(config, steps)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float, poll_s: float = 0.01) -> None:
    """Poll `condition` every `poll_s` seconds until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(poll_s)


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


@dataclass(frozen=True)
class RayHead:
    """A one-node Ray cluster started by `start_ray_head`."""

    dashboard_url: str  # where `ray job submit --address` sends jobs
    gcs_address: str  # HOST:PORT a driver connects to (--ray-address)
    env: dict[str, str]  # for Ray commands and drivers: the cluster's token, no RAY_ADDRESS
    temp_root: str  # the RAY_TMPDIR whose ray/ folder is the cluster's temp dir


@contextmanager
def start_ray_head(node_env: dict[str, str] | None = None) -> Iterator[RayHead]:
    """A one-node Ray cluster with a dashboard, as `ray start --head` makes one; `node_env`: more environment for
    the node (its workers, where the actors run, inherit it).

    The head runs with `--block` in its own process group on free ports (never Redis' 6379) and a private temp dir;
    it is ended by signalling that one process (never `ray stop`, which would stop every Ray on the machine). Token
    authentication uses a token made for it."""
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
    head = subprocess.Popen(command, env=env | (node_env or {}), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
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
        yield RayHead(dashboard_url=url, gcs_address=f"127.0.0.1:{ports['port']}", env=env, temp_root=temp_root)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its session: raylet, GCS and the dashboard, not just `ray start`
            head.wait()
        log.close()
        shutil.rmtree(temp_root, ignore_errors=True)
