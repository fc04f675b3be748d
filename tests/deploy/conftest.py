"""A real Prometheus server for the deployment tests, configured from deploy/prometheus.yml.

`prometheus_server` is a session fixture that returns a factory: `prometheus_server(discovery_dir)`
starts a Prometheus whose file service discovery reads `<discovery_dir>/*.json` (instead of the
deployed /tmp/refine-prometheus), listening on 127.0.0.1 on a free port, with its storage in a
temporary directory. Every server it started is stopped at the end of the session.

The tests that need it are skipped only when no prometheus binary exists (install it with
`apt-get install -y prometheus`; CI does).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.redis_server import parent_death_hook

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOYED_PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus.yml"
DEPLOYED_DISCOVERY_DIR = "/tmp/refine-prometheus"


class PrometheusError(RuntimeError):
    """Prometheus answered an API call with an error (a bad query, an unknown endpoint, ...)."""


def prometheus_binary() -> str | None:
    """The prometheus executable: $PROMETHEUS_BIN, else the one on PATH, else None."""
    configured = os.environ.get("PROMETHEUS_BIN")
    if configured:
        if not Path(configured).is_file():
            raise FileNotFoundError(f"PROMETHEUS_BIN={configured!r} is not a file")
        return configured
    return shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/local/bin")


def prometheus_config_for(discovery_dir: Path, scrape_interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus.yml with its file_sd path moved to `discovery_dir` and a faster scrape interval.

    Raises when the deployed config has no file_sd entry under the default discovery dir: the test
    would otherwise silently exercise a config that differs from the deployed one.
    """
    config = yaml.safe_load(DEPLOYED_PROMETHEUS_CONFIG.read_text())
    moved = 0
    for job in config.get("scrape_configs", []):
        for file_sd in job.get("file_sd_configs", []):
            files = []
            for pattern in file_sd["files"]:
                directory, name = os.path.split(pattern)
                if directory != DEPLOYED_DISCOVERY_DIR:
                    raise ValueError(f"{DEPLOYED_PROMETHEUS_CONFIG}: file_sd path {pattern!r} is not under "
                                     f"{DEPLOYED_DISCOVERY_DIR}")
                files.append(str(Path(discovery_dir) / name))
                moved += 1
            file_sd["files"] = files
        if "scrape_interval" in job:
            job["scrape_interval"] = scrape_interval
    if moved == 0:
        raise ValueError(f"{DEPLOYED_PROMETHEUS_CONFIG} has no file_sd_configs under {DEPLOYED_DISCOVERY_DIR}")
    # Rule files are named relative to the deployed config; this one is written elsewhere.
    config["rule_files"] = [str(DEPLOYED_PROMETHEUS_CONFIG.parent / path) for path in config.get("rule_files", [])]
    config.setdefault("global", {})
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    return config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    """One running Prometheus process and a small client of its HTTP API."""

    def __init__(self, binary: str, discovery_dir: Path, work_dir: Path, scrape_interval: str = "1s"):
        self.discovery_dir = Path(discovery_dir)
        self.discovery_dir.mkdir(parents=True, exist_ok=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = work_dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(prometheus_config_for(self.discovery_dir, scrape_interval)))
        self.log_path = work_dir / "prometheus.log"
        # The port is free when picked, but another process may take it before Prometheus binds it: then
        # Prometheus exits at once, and a fresh port is tried.
        for attempt in range(3):
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={work_dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=parent_death_hook(),  # a killed test session leaves no Prometheus behind
                )
            try:
                self._wait_ready(timeout_s=30.0)
                return
            except RuntimeError as exited:
                self.stop()
                if "address already in use" not in str(exited) or attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout_s}s:\n{self._log_tail()}")

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns its `data`, raises PrometheusError on an error answer."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now; returns the result series (a scalar becomes one series)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def label_values(self, label: str) -> set[str]:
        return set(self.api(f"label/{label}/values"))

    def label_names(self) -> set[str]:
        return set(self.api("labels"))

    def active_targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        """Poll `condition` until it holds; raise TimeoutError naming `what` if it never does."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout_s}s still not: {what}")
            time.sleep(0.25)

    def wait_for_targets(self, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least `count` discovered targets have been scraped successfully."""
        def enough_up() -> bool:
            return sum(target["health"] == "up" for target in self.active_targets()) >= count

        try:
            self.wait_until(enough_up, f"{count} targets up", timeout_s)
        except TimeoutError as error:
            states = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in self.active_targets()]
            raise TimeoutError(f"{error}; targets: {states}") from None
        return [target for target in self.active_targets() if target["health"] == "up"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory: `prometheus_server(discovery_dir, scrape_interval="1s")` starts a PrometheusServer."""
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("prometheus binary not found (install it: apt-get install -y prometheus; "
                    "or set PROMETHEUS_BIN)")
    started: list[PrometheusServer] = []

    def start(discovery_dir: Path, scrape_interval: str = "1s") -> PrometheusServer:
        server = PrometheusServer(binary, Path(discovery_dir), tmp_path_factory.mktemp("prometheus"), scrape_interval)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
