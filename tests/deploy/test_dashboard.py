"""The Grafana dashboard uses only metrics, labels and label values that a real Prometheus scrape shows.

Fake role processes of two concurrent runs serve services.metrics exactly as the real roles do (ephemeral
port, discovery file with the run's label); a real Prometheus configured from deploy/prometheus.yml
discovers and scrapes them; every PromQL expression of deploy/grafana/dashboards/refine.json is then
checked against what it scraped, with the dashboard's run selector on All and on each run.
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
# Two runs share the Prometheus, as concurrent runs do; each has every process above.
RUNS = ("refine-run-a", "refine-run-b")
FAKE_TARGETS = tuple((run, role, instance) for run in RUNS for role, instance in FAKE_PROCESSES)
# What the run selector's All stands for (the dashboard's allValue): any run.
ALL_RUNS = ".+"


# --- a small PromQL reader: enough to find metric names, label matchers, grouping labels and selectors ----

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
class Selector:
    """One vector selector: its metric name ("" if it names none) and its own label matchers."""
    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


@dataclass
class ParsedQuery:
    metric_names: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value), all selectors'
    grouping_labels: set[str] = field(default_factory=set)
    selectors: list[Selector] = field(default_factory=list)


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
    """Metric names, label matchers, grouping labels and vector selectors of a PromQL expression."""
    tokens = _tokens(expr)
    parsed = ParsedQuery()
    named_selector_at = -1  # token index of the last metric name, whose braces (if any) follow it
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if text == "{":
            if named_selector_at != i - 1:  # braces alone: {__name__="m", ...}
                parsed.selectors.append(Selector(""))
            selector = parsed.selectors[-1]
            i += 1
            while tokens[i][1] != "}":
                if tokens[i][1] == ",":
                    i += 1
                    continue
                label, op, value = tokens[i][1], tokens[i + 1][1], _unquote(tokens[i + 2][1])
                parsed.matchers.append((label, op, value))
                selector.matchers.append((label, op, value))
                if label == "__name__" and op == "=":
                    parsed.metric_names.add(value)
                    selector.name = value
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
                parsed.selectors.append(Selector(text))
                named_selector_at = i
        i += 1
    return parsed


_GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def with_grafana_variables(expr: str, run: str = ALL_RUNS) -> str:
    """Replace Grafana's built-in interval variables by a concrete range and the run selector `$run` by `run`:
    by default its All (a regex of any run), else the one run picked; any other variable is an error."""
    def replace(match: re.Match[str]) -> str:
        if match.group(1) in ("__rate_interval", "__interval", "__range"):
            return "1m"
        if match.group(1) == "run":
            return run
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


def dashboard_variable(name: str) -> dict[str, Any]:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    found = [variable for variable in variables if variable["name"] == name]
    assert len(found) == 1, f"the dashboard defines {len(found)} variables named {name!r}: {variables}"
    return found[0]


def label_values_query(variable: dict[str, Any]) -> tuple[str, str]:
    """(metric, label) of a query variable `label_values(metric, label)` (Grafana stores the query as a
    string or, in newer versions, as an object holding it)."""
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)\s*", query)
    assert match, f"variable {variable['name']!r}: {query!r} is not label_values(<metric>, <label>)"
    return match.group(1), match.group(2)


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

    parsed = parse_promql('sum by (run) (rate(a{run=~"r", role="x"}[1m])) / b + {__name__="c", run="s"}')
    assert [(s.name, s.matchers) for s in parsed.selectors] == [
        ("a", [("run", "=~", "r"), ("role", "=", "x")]), ("b", []), ("c", [("__name__", "=", "c"), ("run", "=", "s")])]
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
                "refine_approx_kl", "refine_grad_norm", "refine_learning_rate", "refine_eval_ntp_loss", "refine_data_epoch",
                "refine_step_seconds_bucket",
                "refine_weight_version",
                "refine_rollout_staleness_bucket", "refine_stale_rollouts_dropped_total", "refine_stream_length",
                "refine_stream_pending", "refine_reward_latency_seconds_bucket"}
    assert required - used == set()


def test_dashboard_uses_only_metrics_that_services_metrics_defines() -> None:
    exposed = exposed_metric_names()
    for title, ref_id, expr in QUERIES:
        unknown = parse_promql(with_grafana_variables(expr)).metric_names - exposed
        assert not unknown, f"panel {title!r} query {ref_id}: {sorted(unknown)} not defined in services/metrics.py"


def test_dashboard_has_a_run_selector_defaulting_to_every_run() -> None:
    variable = dashboard_variable("run")
    datasource_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    assert variable["type"] == "query"
    assert variable["datasource"] == {"type": "prometheus", "uid": datasource_uid}
    metric, label = label_values_query(variable)
    assert label == "run"
    assert metric in exposed_metric_names()
    assert variable["multi"] is True and variable["includeAll"] is True
    assert variable["allValue"] == ALL_RUNS  # what with_grafana_variables puts for All
    assert variable["current"]["value"] in ("$__all", ["$__all"])
    assert variable["refresh"] in (1, 2)  # runs started later are listed (on load / on time range change)


def test_every_dashboard_query_filters_every_selector_on_the_run_selector() -> None:
    """`=~` (not `=`): Grafana writes several picked runs, and All, as a regex."""
    for title, ref_id, expr in QUERIES:
        parsed = parse_promql(with_grafana_variables(expr, run="$run"))  # $run left as written
        assert parsed.selectors, (title, ref_id, expr)
        for selector in parsed.selectors:
            assert ("run", "=~", "$run") in selector.matchers, \
                f'panel {title!r} query {ref_id}: {selector.name} has no run=~"$run": {expr}'


# --- against a real scrape ---------------------------------------------------------------------------------

@dataclass
class FakeRole:
    run: str
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


def start_fake_role(run: str, role: str, instance: str, discovery_dir: Path, log_dir: Path) -> FakeRole:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               REFINE_METRICS_HOST="127.0.0.1")
    log = log_dir / f"{run}-{role}-{instance}.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, str(FAKE_ROLE), "--role", role, "--instance", instance,
                                    "--discovery-dir", str(discovery_dir), "--run", run],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   cwd=REPO_ROOT, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=10)
        raise RuntimeError(f"fake {role} {instance} of {run} exited with {process.returncode}: "
                           f"{log.read_text()[-2000:]}")
    return FakeRole(run, role, instance, process, json.loads(line))


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
        for run, role, instance in FAKE_TARGETS:
            roles.append(start_fake_role(run, role, instance, discovery_dir, log_dir))
        prometheus.wait_for_targets(len(FAKE_TARGETS))
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
    assert all(Path(fake.announced["discovery_file"]).name.startswith(f"{fake.role}-{fake.instance}-{fake.run}~")
               for fake in fake_roles)
    targets = prometheus.wait_for_targets(len(FAKE_TARGETS))
    labels = sorted((t["labels"]["run"], t["labels"]["role"], t["labels"]["instance_id"]) for t in targets)
    assert labels == sorted(FAKE_TARGETS)
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
                # Every alternative of a regex matcher matches a value that exists (a plain one: names it).
                for alternative in value.split("|"):
                    assert any(re.fullmatch(alternative, existing) for existing in prometheus.label_values(label)), \
                        (title, ref_id, label, alternative)


def assert_queries_show_runs(prometheus: Any, queries: list[tuple[str, str, str]], runs: set[str]) -> None:
    """Prometheus itself parses each query (an invalid one raises); once every target has been scraped twice
    (rates need two samples) each must return series, and those of exactly `runs`: every series keeps its run
    label, so no aggregation mixes runs."""
    wrong: list[tuple[str, str, set[str | None]]] = []

    def all_show_runs() -> bool:
        wrong[:] = []
        for title, ref_id, expr in queries:
            shown = {series["metric"].get("run") for series in prometheus.query(expr)}
            if shown != runs:
                wrong.append((title, ref_id, shown))
        return not wrong

    try:
        prometheus.wait_until(all_show_runs, f"every dashboard query returns series of runs {sorted(runs)}",
                              timeout_s=20.0)
    except TimeoutError:
        pass
    assert wrong == [], f"dashboard queries whose series are not those of runs {sorted(runs)}: {wrong}"


def test_every_dashboard_query_is_valid_promql_with_data(prometheus: Any, scraped_names: set[str]) -> None:
    """With the run selector on All (its default), each query shows every run, each apart."""
    queries = [(title, ref_id, with_grafana_variables(expr)) for title, ref_id, expr in QUERIES]
    assert_queries_show_runs(prometheus, queries, set(RUNS))


def test_run_selector_lists_every_run_from_a_metric_every_process_exports(prometheus: Any,
                                                                          scraped_names: set[str]) -> None:
    metric, label = label_values_query(dashboard_variable("run"))
    assert metric in scraped_names

    def offered() -> set[str]:  # what Grafana's label_values(metric, label) asks Prometheus
        return set(prometheus.api(f"label/{label}/values", **{"match[]": metric}))

    def exporters() -> set[tuple[str, str, str]]:
        return {(s["metric"].get("run", ""), s["metric"]["role"], s["metric"]["instance_id"])
                for s in prometheus.query(metric)}

    try:
        prometheus.wait_until(lambda: offered() == set(RUNS) and exporters() == set(FAKE_TARGETS),
                              f"{metric} scraped from every process of every run")
    except TimeoutError:
        pass
    assert offered() == set(RUNS)
    # Every process exports it, so a run is listed whichever of its roles are up.
    assert exporters() == set(FAKE_TARGETS)


def test_dashboard_queries_on_one_run_name_scraped_series_of_that_run_alone(prometheus: Any,
                                                                            scraped_names: set[str]) -> None:
    metric, label = label_values_query(dashboard_variable("run"))
    offered = sorted(prometheus.api(f"label/{label}/values", **{"match[]": metric}))
    assert offered == sorted(RUNS)
    label_names = prometheus.label_names()
    for run in offered:  # each value the selector offers, picked alone
        queries = [(title, ref_id, with_grafana_variables(expr, run=run)) for title, ref_id, expr in QUERIES]
        for title, ref_id, expr in queries:
            parsed = parse_promql(expr)
            assert parsed.metric_names <= scraped_names, (title, ref_id, parsed.metric_names - scraped_names)
            assert parsed.grouping_labels <= label_names, (title, ref_id, parsed.grouping_labels - label_names)
            assert all(("run", "=~", run) in selector.matchers for selector in parsed.selectors), (title, ref_id)
        assert_queries_show_runs(prometheus, queries, {run})
    # The dashboard's process count, on one run, counts that run's processes alone.
    [count] = [expr for title, _, expr in QUERIES if title == "Processes by role"]
    processes = prometheus.query(with_grafana_variables(count, run=RUNS[0]))
    assert {s["metric"]["role"]: int(s["value"][1]) for s in processes} == {
        role: sum(r == role for r, _ in FAKE_PROCESSES) for role in ROLES}


def test_a_stopped_role_leaves_discovery_and_scraping(prometheus: Any, fake_roles: list[FakeRole],
                                                      discovery_dir: Path, tmp_path: Path) -> None:
    extra = start_fake_role(RUNS[0], "rollout_worker", "extra", discovery_dir, tmp_path)
    try:
        prometheus.wait_for_targets(len(FAKE_TARGETS) + 1)
    finally:
        extra.stop()
    assert not Path(extra.announced["discovery_file"]).exists()
    address = f"{extra.announced['host']}:{extra.announced['port']}"
    prometheus.wait_until(lambda: address not in {t["labels"]["instance"] for t in prometheus.active_targets()},
                          f"target {address} dropped after its discovery file was removed")


def test_alert_rules_are_loaded_and_evaluate_on_the_scrape(prometheus: Any, scraped_names: set[str]) -> None:
    """deploy/prometheus.yml's rule_files: the real Prometheus loads every alert of deploy/prometheus-alerts.yml and
    evaluates it without error on what it scraped, whose metrics they all use."""
    defined = {rule["alert"]: rule["expr"] for group in yaml.safe_load(
        (REPO_ROOT / "deploy" / "prometheus-alerts.yml").read_text())["groups"] for rule in group["rules"]}
    for name, expr in defined.items():
        missing = parse_promql(expr).metric_names - scraped_names - {"up"}
        assert not missing, f"alert {name}: {sorted(missing)} not in a real scrape"

    def evaluated() -> list[dict[str, Any]]:
        return [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]
                if rule["type"] == "alerting" and rule.get("lastEvaluation", "").startswith("2")]

    prometheus.wait_until(lambda: {rule["name"] for rule in evaluated()} == set(defined),
                          "every alert of deploy/prometheus-alerts.yml loaded and evaluated")
    for rule in evaluated():
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert rule["query"] == defined[rule["name"]], rule["name"]


def test_per_role_rollout_panels_leave_out_a_learner_that_samples_no_rollouts(prometheus: Any,
                                                                              scraped_names: set[str]) -> None:
    """A disaggregated learner exports refine_rollouts_total at 0 for good: it drew a flat 0 "learner" line beside
    the workers'. A colocated learner, which samples its own rollouts, counts them and is shown."""
    workers = {(run, "rollout_worker", instance) for run in RUNS for role, instance in FAKE_PROCESSES
               if role == "rollout_worker"}
    for title in ("Rollouts / s", "Rollout tokens / s"):
        [expr] = [expr for t, ref_id, expr in QUERIES if t == title and "instance_id" in expr]
        shown = {(s["metric"]["run"], s["metric"]["role"], s["metric"]["instance_id"])
                 for s in prometheus.query(with_grafana_variables(expr))}
        assert shown == workers, title
