"""deploy/prometheus-alerts.yml: valid rules (promtool), alerts that fire when they should and only then (their
unit test, tests/deploy/prometheus-alerts.test.yml), on metrics services/metrics.py defines, apart per run.
tests/deploy/test_dashboard.py checks that a real Prometheus loads and evaluates them on a real scrape."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from test_dashboard import exposed_metric_names, parse_promql

REPO_ROOT = Path(__file__).resolve().parents[2]
ALERTS = REPO_ROOT / "deploy" / "prometheus-alerts.yml"
ALERTS_TEST = Path(__file__).with_name("prometheus-alerts.test.yml")


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def promtool() -> str:
    found = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin:/usr/local/bin")
    if found is None:
        pytest.skip("promtool not found (it ships with the prometheus package: apt-get install -y prometheus)")
    return found


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_when_they_should_and_only_then() -> None:
    """promtool's rule unit test: a stall fires after 15 quiet minutes (not on a learner restart), skipped steps
    while they happen, a role down after a minute of failed scrapes; each with its labels and annotations."""
    result = subprocess.run([promtool(), "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True,
                            timeout=60, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert tested == {rule["alert"] for rule in alert_rules()}  # every alert has a test


def test_alerts_use_only_metrics_services_metrics_defines_and_keep_runs_apart() -> None:
    exposed = exposed_metric_names() | {"up"}  # up: Prometheus' own, one per target with the target's labels
    for rule in alert_rules():
        parsed = parse_promql(rule["expr"])
        assert parsed.metric_names and parsed.metric_names <= exposed, (rule["alert"], parsed.metric_names - exposed)
        # Every alert is of one run: aggregations keep `run` (up keeps all of its target's labels).
        assert parsed.metric_names == {"up"} or "run" in parsed.grouping_labels, rule["alert"]
        assert "{{ $labels.run }}" in rule["annotations"]["summary"], rule["alert"]
