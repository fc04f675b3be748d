"""A real Prometheus scrapes a live `refine train` service run: every role, every dashboard metric."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_dashboard import dashboard_queries, parse_promql, with_grafana_variables

from refine.config import load_config

REPO = Path(__file__).resolve().parents[2]
ROLES = {"orchestrator", "rollout_worker", "reward", "learner"}

pytestmark = pytest.mark.slow  # starts Ray, Redis and Prometheus around a 150-step service run


def test_prometheus_finds_every_role_and_dashboard_metric_of_a_live_run(prometheus_server: Any, tmp_path: Path):
    from services.orchestrator import run

    discovery = tmp_path / "prometheus"
    discovery.mkdir()
    prometheus = prometheus_server(discovery, scrape_interval="1s")
    # A run long enough (tens of seconds) that even a busy Prometheus discovers and scrapes every role
    # while it is live; the scraped series stay queryable after it.
    config = load_config(REPO / "configs" / "service_tiny.yaml", [
        f"train.out_dir={tmp_path / 'run'}", "train.steps=150", "train.checkpoint_every=0",
        f"service.metrics_discovery_dir={discovery}", f"service.namespace=scrape-{uuid.uuid4().hex[:8]}",
    ])
    seen_roles: set[str] = set()
    finished = threading.Event()

    def watch_targets() -> None:  # which roles Prometheus scraped successfully while the run was live
        while not finished.is_set():
            seen_roles.update(t["labels"]["role"] for t in prometheus.active_targets() if t["health"] == "up")
            finished.wait(0.5)

    watcher = threading.Thread(target=watch_targets)
    watcher.start()
    try:
        stats = run(config, progress=False)
    finally:
        finished.set()
        watcher.join()
    assert stats["step"] == 150
    assert ROLES <= seen_roles, f"roles never scraped while live: {sorted(ROLES - seen_roles)}"
    wanted = set()
    for _, _, expr in dashboard_queries():
        wanted |= parse_promql(with_grafana_variables(expr)).metric_names
    prometheus.wait_until(lambda: wanted <= prometheus.label_values("__name__"),
                          "every dashboard metric in the live run's scrape", timeout_s=30)
    assert ROLES <= prometheus.label_values("role")
    # The run is over, so its series are stale now: look back over the run.
    steps = prometheus.query('max(max_over_time(refine_learner_steps_total{role="learner"}[10m]))')
    assert steps and float(steps[0]["value"][1]) >= 1
    step = prometheus.query('max(max_over_time(refine_learner_step{role="learner"}[10m]))')
    # The run's step; a fresh run's learner has taken all of them (same scrape as the counter's).
    assert step and float(step[0]["value"][1]) == float(steps[0]["value"][1])
