"""The Grafana dashboard uses only metrics, labels and label values that a real Prometheus scrape shows.

Fake role processes serve services.metrics exactly as the real roles do (ephemeral port, discovery
file); a real Prometheus configured from deploy/prometheus.yml discovers and scrapes them; every PromQL
expression of deploy/grafana/dashboards/refine.json is then checked against what it scraped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.metrics import Metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "refine.json"
DATASOURCES = REPO_ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
FAKE_ROLE = Path(__file__).with_name("fake_role.py")

ROLES = ("orchestrator", "rollout_worker", "reward", "learner")
FAKE_PROCESSES = (("orchestrator", "0"), ("rollout_worker", "0"), ("rollout_worker", "1"), ("reward", "0"),
                  ("learner", "0"))


# --- a small PromQL reader: enough to find metric names, label matchers and grouping labels ---------------

_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@])
""", re.VERBOSE)

_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                 "topk", "quantile", "limitk", "limit_ratio"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _AGGREGATIONS | _GROUPING | {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"}


@dataclass
class ParsedQuery:
    metric_names: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)
    grouping_labels: set[str] = field(default_factory=set)


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"PromQL: unexpected character {expr[position]!r} at {position} in {expr!r}")
        position = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
    return tokens


def _unquote(literal: str) -> str:
    """The value of a PromQL string literal (its escapes are those of JSON for what dashboards use)."""
    if literal[0] == "`":
        return literal[1:-1]
    inner = literal[1:-1]
    if literal[0] == "'":
        inner = inner.replace("\\'", "'").replace('"', '\\"')
    return json.loads(f'"{inner}"')


def parse_promql(expr: str) -> ParsedQuery:
    """Metric names, label matchers and grouping labels of a PromQL expression."""
    tokens = _tokens(expr)
    parsed = ParsedQuery()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if text == "{":
            i += 1
            while tokens[i][1] != "}":
                if tokens[i][1] == ",":
                    i += 1
                    continue
                label, op, value = tokens[i][1], tokens[i + 1][1], _unquote(tokens[i + 2][1])
                parsed.matchers.append((label, op, value))
                if label == "__name__" and op == "=":
                    parsed.metric_names.add(value)
                i += 3
        elif text == "[":
            while tokens[i][1] != "]":
                i += 1
        elif kind == "ident" and text.lower() in _GROUPING:
            if i + 1 < len(tokens) and tokens[i + 1][1] == "(":
                i += 2
                while tokens[i][1] != ")":
                    if tokens[i][0] == "ident":
                        parsed.grouping_labels.add(tokens[i][1])
                    i += 1
        elif kind == "ident":
            is_call = i + 1 < len(tokens) and tokens[i + 1][1] == "("
            if not is_call and text.lower() not in _KEYWORDS:
                parsed.metric_names.add(text)
        i += 1
    return parsed


_GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def with_grafana_variables(expr: str) -> str:
    """Replace Grafana's built-in interval variables by a concrete range; any other variable is an error."""
    def replace(match: re.Match[str]) -> str:
        if match.group(1) in ("__rate_interval", "__interval", "__range"):
            return "1m"
        raise ValueError(f"dashboard query uses template variable ${match.group(1)}, which the dashboard does not "
                         f"define: {expr!r}")
    return _GRAFANA_VARIABLE.sub(replace, expr)


# --- the dashboard -------------------------------------------------------------------------------------------

def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel, rows' nested panels included."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["refId"], target["expr"])
            for panel in panels(dashboard["panels"]) for target in panel.get("targets", [])]


def exposed_metric_names() -> set[str]:
    """Every sample name services.metrics exposes: counters as *_total, histograms as *_bucket/_sum/_count."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for family in Metrics().registry.collect():
        if family.type not in suffixes:
            raise ValueError(f"metric {family.name}: type {family.type!r} is not handled by this test")
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


QUERIES = dashboard_queries()


def test_promql_reader_finds_metrics_labels_and_grouping() -> None:
    parsed = parse_promql('histogram_quantile(0.95, sum by (phase, le) '
                          '(rate(refine_step_seconds_bucket{role="learner", phase=~"fw|bw"}[5m:30s] offset 1m)))')
    assert parsed.metric_names == {"refine_step_seconds_bucket"}
    assert parsed.matchers == [("role", "=", "learner"), ("phase", "=~", "fw|bw")]
    assert parsed.grouping_labels == {"phase", "le"}

    parsed = parse_promql('sum without (instance) (a_b:c) / on (node) group_left (role) max(other) '
                          'and {__name__="named", job!="x"} > bool 0.5e3 unless count(x) by (role)')
    assert parsed.metric_names == {"a_b:c", "other", "named", "x"}
    assert parsed.grouping_labels == {"instance", "node", "role"}
    assert ("job", "!=", "x") in parsed.matchers

    assert parse_promql('label_replace(m, "dst", "$1", "src", "(.*)")').metric_names == {"m"}
    with pytest.raises(ValueError, match="unexpected character"):
        parse_promql("rate(m[5m]) ; drop")


def test_dashboard_has_queries_on_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource_uid, (panel["title"], target["refId"])
            assert target["expr"].strip(), (panel["title"], target["refId"])


def test_dashboard_covers_every_observability_signal() -> None:
    """DESIGN's list of signals: each must be charted by at least one query."""
    used = set().union(*(parse_promql(with_grafana_variables(expr)).metric_names for _, _, expr in QUERIES))
    required = {"refine_rollouts_total", "refine_rollout_tokens_total", "refine_reward_mean", "refine_reward_std",
                "refine_selected_entropy", "refine_policy_loss", "refine_ntp_loss", "refine_clip_fraction",
                "refine_approx_kl", "refine_grad_norm", "refine_step_seconds_bucket", "refine_weight_version",
                "refine_rollout_staleness_bucket", "refine_stale_rollouts_dropped_total", "refine_stream_length",
                "refine_stream_pending", "refine_reward_latency_seconds_bucket"}
    assert required - used == set()


def test_dashboard_uses_only_metrics_that_services_metrics_defines() -> None:
    exposed = exposed_metric_names()
    for title, ref_id, expr in QUERIES:
        unknown = parse_promql(with_grafana_variables(expr)).metric_names - exposed
        assert not unknown, f"panel {title!r} query {ref_id}: {sorted(unknown)} not defined in services/metrics.py"


# --- against a real scrape ---------------------------------------------------------------------------------

@dataclass
class FakeRole:
    role: str
    instance: str
    process: subprocess.Popen[str]
    announced: dict[str, Any]

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_fake_role(role: str, instance: str, discovery_dir: Path, log_dir: Path) -> FakeRole:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               REFINE_METRICS_HOST="127.0.0.1")
    log = log_dir / f"{role}-{instance}.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, str(FAKE_ROLE), "--role", role, "--instance", instance,
                                    "--discovery-dir", str(discovery_dir)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   cwd=REPO_ROOT, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=10)
        raise RuntimeError(f"fake {role} {instance} exited with {process.returncode}: {log.read_text()[-2000:]}")
    return FakeRole(role, instance, process, json.loads(line))


@pytest.fixture(scope="module")
def discovery_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("discovery")


@pytest.fixture(scope="module")
def prometheus(prometheus_server: Any, discovery_dir: Path) -> Any:
    return prometheus_server(discovery_dir)


@pytest.fixture(scope="module")
def fake_roles(prometheus: Any, discovery_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FakeRole]]:
    # Prometheus runs first: the roles appear while it watches the directory, as actors do.
    log_dir = tmp_path_factory.mktemp("fake-roles")
    roles: list[FakeRole] = []
    try:
        for role, instance in FAKE_PROCESSES:
            roles.append(start_fake_role(role, instance, discovery_dir, log_dir))
        prometheus.wait_for_targets(len(FAKE_PROCESSES))
        yield roles
    finally:
        for fake in roles:
            fake.stop()


@pytest.fixture(scope="module")
def scraped_names(prometheus: Any, fake_roles: list[FakeRole]) -> set[str]:
    expected = exposed_metric_names()
    # A target is "up" after its first scrape; its samples become queryable a moment later.
    prometheus.wait_until(lambda: expected <= prometheus.label_values("__name__"),
                          "every metric of services/metrics.py in Prometheus")
    return prometheus.label_values("__name__")


def test_every_role_is_discovered_and_scraped_with_its_labels(prometheus: Any, fake_roles: list[FakeRole],
                                                              discovery_dir: Path) -> None:
    assert sorted(path.name for path in discovery_dir.glob("*.json")) == sorted(
        Path(fake.announced["discovery_file"]).name for fake in fake_roles)
    assert all(Path(fake.announced["discovery_file"]).name.startswith(f"{fake.role}-{fake.instance}~")
               for fake in fake_roles)
    targets = prometheus.wait_for_targets(len(FAKE_PROCESSES))
    labels = sorted((t["labels"]["role"], t["labels"]["instance_id"]) for t in targets)
    assert labels == sorted(FAKE_PROCESSES)
    for target in targets:
        assert target["labels"]["job"] == "refine"
        assert target["labels"]["node"], target
        assert target["labels"]["instance"] == target["discoveredLabels"]["__address__"]
    announced = {f"{fake.announced['host']}:{fake.announced['port']}" for fake in fake_roles}
    assert {t["labels"]["instance"] for t in targets} == announced


def test_every_metric_of_services_metrics_is_in_the_scrape(scraped_names: set[str]) -> None:
    assert exposed_metric_names() - scraped_names == set()


def test_every_dashboard_metric_is_in_the_scrape(scraped_names: set[str]) -> None:
    for title, ref_id, expr in QUERIES:
        missing = parse_promql(with_grafana_variables(expr)).metric_names - scraped_names
        assert not missing, f"panel {title!r} query {ref_id}: {sorted(missing)} not in a real scrape"


def test_dashboard_labels_and_role_values_exist_in_the_scrape(prometheus: Any, scraped_names: set[str]) -> None:
    assert prometheus.label_values("role") == set(ROLES)
    label_names = prometheus.label_names()
    for title, ref_id, expr in QUERIES:
        parsed = parse_promql(with_grafana_variables(expr))
        assert parsed.grouping_labels <= label_names, (title, ref_id, parsed.grouping_labels - label_names)
        for label, op, value in parsed.matchers:
            assert label in label_names, (title, ref_id, label)
            if op == "=":
                assert value in prometheus.label_values(label), (title, ref_id, label, value)
            elif op == "=~":
                # Every alternative of a regex matcher names a value that exists.
                for alternative in value.split("|"):
                    assert alternative in prometheus.label_values(label), (title, ref_id, label, alternative)


def test_every_dashboard_query_is_valid_promql_with_data(prometheus: Any, scraped_names: set[str]) -> None:
    """Prometheus itself parses each query (an invalid one raises); each must return series once
    every target has been scraped twice (rates need two samples)."""
    queries = [(title, ref_id, with_grafana_variables(expr)) for title, ref_id, expr in QUERIES]
    empty: list[tuple[str, str, str]] = []

    def all_have_data() -> bool:
        empty[:] = [query for query in queries if not prometheus.query(query[2])]
        return not empty

    try:
        prometheus.wait_until(all_have_data, "every dashboard query returns series", timeout_s=20.0)
    except TimeoutError:
        pass
    assert empty == [], f"dashboard queries without data: {empty}"


def test_a_stopped_role_leaves_discovery_and_scraping(prometheus: Any, fake_roles: list[FakeRole],
                                                      discovery_dir: Path, tmp_path: Path) -> None:
    extra = start_fake_role("rollout_worker", "extra", discovery_dir, tmp_path)
    try:
        prometheus.wait_for_targets(len(FAKE_PROCESSES) + 1)
    finally:
        extra.stop()
    assert not Path(extra.announced["discovery_file"]).exists()
    address = f"{extra.announced['host']}:{extra.announced['port']}"
    prometheus.wait_until(lambda: address not in {t["labels"]["instance"] for t in prometheus.active_targets()},
                          f"target {address} dropped after its discovery file was removed")
