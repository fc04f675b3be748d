"""Prometheus metrics: each role exports its own families; discovery files: one per serving process, withdrawn by
that process alone."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase

from services.metrics import (
    ALL_FAMILIES, COLOCATED_LEARNER_FAMILIES, ROLE_FAMILIES, Metrics, metrics_host, prepare_discovery_dir,
    serve_metrics, withdraw_announcements, withdraw_run_announcements,
)

REPO = Path(__file__).resolve().parents[2]
# Where each role's process updates its metrics (reward/scoring.py: a reward replica's and the HTTP API's).
ROLE_CODE = {"orchestrator": ["services/orchestrator.py"], "rollout_worker": ["rollout_workers/worker.py"],
             "reward": ["reward/scoring.py"], "learner": ["learner/learner.py"]}


def test_every_metric_family_belongs_to_a_role():
    families = {name for name, value in vars(Metrics()).items() if isinstance(value, MetricWrapperBase)}
    assert families == ALL_FAMILIES
    with pytest.raises(ValueError, match=r"unknown metric families \['ntp_los'\]"):
        Metrics(families={"ntp_los"})


def test_a_process_exports_its_roles_families_alone_and_may_still_update_the_others():
    """Every process exported every family: an orchestrator's refine_ntp_loss 0 and a reward replica's
    refine_weight_version 0 entered any query that does not filter on the role."""
    metrics = Metrics(families=ROLE_FAMILIES["reward"])
    metrics.ntp_loss.set(2.5)  # another role's family: kept out of the scrape, not an error
    metrics.scored_batches.inc()
    scrape = generate_latest(metrics.registry).decode()
    exported = {family.name for family in metrics.registry.collect()}
    assert exported == {"refine_reward_mean", "refine_reward_std", "refine_reward_latency_seconds",
                        "refine_scored_batches"}
    assert "refine_ntp_loss" not in scrape and "refine_scored_batches_total 1.0" in scrape
    assert "refine_ntp_loss" in generate_latest(Metrics().registry).decode()  # the library default: all


@pytest.mark.parametrize("role", sorted(ROLE_CODE))
def test_each_roles_code_updates_only_families_its_process_exports(role):
    allowed = ROLE_FAMILIES[role] | (COLOCATED_LEARNER_FAMILIES if role == "learner" else set())
    used = set()
    for path in ROLE_CODE[role]:
        used |= set(re.findall(r"\b(?:metrics|m)\.(\w+)\.(?:inc|set|observe|labels)\(", (REPO / path).read_text()))
    assert used and used <= ALL_FAMILIES
    assert used <= allowed, f"{role} updates {sorted(used - allowed)}, which its process does not export"


def announced_targets(directory: Path) -> dict[str, list[str]]:
    return {path.name: json.loads(path.read_text())[0]["targets"] for path in directory.glob("*.json")}


def test_same_member_of_two_runs_keeps_its_own_discovery_file(tmp_path: Path) -> None:
    # Two runs on one node: each has a learner with the member id "learner-0".
    run_a = serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=tmp_path, bind="127.0.0.1")
    run_b = serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=tmp_path, bind="127.0.0.1")
    try:
        assert run_a.discovery_file != run_b.discovery_file
        for endpoint in (run_a, run_b):
            assert endpoint.discovery_file is not None and endpoint.discovery_file.name.startswith("learner-learner-0~")
            (entry,) = json.loads(endpoint.discovery_file.read_text())
            assert entry["targets"] == [f"{endpoint.host}:{endpoint.port}"]
            assert entry["labels"]["role"] == "learner" and entry["labels"]["instance_id"] == "learner-0"
        assert sorted(t for targets in announced_targets(tmp_path).values() for t in targets) == sorted(
            [f"{run_a.host}:{run_a.port}", f"{run_b.host}:{run_b.port}"])

        run_b.close()  # run B finishes; run A still serves and stays announced
        assert announced_targets(tmp_path) == {run_a.discovery_file.name: [f"{run_a.host}:{run_a.port}"]}
        with urllib.request.urlopen(f"http://127.0.0.1:{run_a.port}/metrics", timeout=5) as response:
            assert b"refine_learner_steps_total" in response.read()
    finally:
        run_a.close()
        run_b.close()
    assert announced_targets(tmp_path) == {}


def test_an_empty_metrics_host_announces_loopback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFINE_METRICS_HOST", "")  # what `export REFINE_METRICS_HOST="$(hostname -i)"` leaves on failure
    endpoint = serve_metrics(Metrics(), role="reward", instance="reward-0", discovery_dir=tmp_path, bind="127.0.0.1")
    try:
        assert list(announced_targets(tmp_path).values()) == [[f"127.0.0.1:{endpoint.port}"]]
    finally:
        endpoint.close()
    monkeypatch.setenv("REFINE_METRICS_HOST", "fd00::5")
    endpoint = serve_metrics(Metrics(), role="reward", instance="reward-0", discovery_dir=tmp_path, bind="127.0.0.1")
    try:
        assert list(announced_targets(tmp_path).values()) == [[f"[fd00::5]:{endpoint.port}"]]
    finally:
        endpoint.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1) to serve on")
def test_an_ipv6_metrics_host_is_served_at_the_announced_target(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFINE_METRICS_HOST", "::1")
    endpoint = serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=tmp_path)
    try:
        [[target]] = announced_targets(tmp_path).values()
        assert target == f"[::1]:{endpoint.port}"
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
            assert response.status == 200 and b"refine_learner_steps_total" in response.read()
    finally:
        endpoint.close()


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (the one its default route leaves from), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: a UDP connect sends nothing, it only picks the route
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.parametrize("value,bound", [
    (None, "127.0.0.1"), ("", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("localhost", "127.0.0.1"),
    ("127.0.0.2", "127.0.0.2"),
])
def test_metrics_are_served_on_loopback_alone_without_a_host_other_machines_reach(
    tmp_path: Path, monkeypatch, value: str | None, bound: str
) -> None:
    """Every role listened on 0.0.0.0 while it announced 127.0.0.1: on a shared node anyone on its network read
    the run's metrics."""
    if value is None:
        monkeypatch.delenv("REFINE_METRICS_HOST", raising=False)
    else:
        monkeypatch.setenv("REFINE_METRICS_HOST", value)
    endpoint = serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=tmp_path)
    try:
        assert endpoint.server.socket.getsockname()[:2] == (bound, endpoint.port)
        [[target]] = announced_targets(tmp_path).values()
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
            assert response.status == 200 and b"refine_learner_steps_total" in response.read()
        other = _non_loopback_address()
        if other is not None:  # the node's network address finds nothing listening
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, endpoint.port), timeout=5).close()
    finally:
        endpoint.close()


@pytest.mark.parametrize("value,bound", [
    ("10.0.0.5", "0.0.0.0"), ("node-1.cluster.local", "0.0.0.0"), ("refine_ray-head_1", "0.0.0.0"),
    ("fd00::5", "::"),
])
def test_metrics_are_served_on_every_interface_for_a_host_other_machines_reach(
    tmp_path: Path, monkeypatch, value: str, bound: str
) -> None:
    """The multi-node case (docker-compose's containers, deploy/ray/local-cluster.yaml's nodes): Prometheus scrapes
    the announced REFINE_METRICS_HOST from another machine or container."""
    if ":" in value and not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 to serve on")
    monkeypatch.setenv("REFINE_METRICS_HOST", value)
    endpoint = serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=tmp_path)
    try:
        assert endpoint.server.socket.getsockname()[:2] == (bound, endpoint.port)
        loopback = "[::1]" if bound == "::" else "127.0.0.1"
        with urllib.request.urlopen(f"http://{loopback}:{endpoint.port}/metrics", timeout=10) as response:
            assert response.status == 200
        other = _non_loopback_address()
        if other is not None and bound == "0.0.0.0":  # the node's network address reaches it, as Prometheus does
            socket.create_connection((other, endpoint.port), timeout=5).close()
    finally:
        endpoint.close()


@pytest.mark.parametrize("host,bound", [
    ("127.0.0.1", "127.0.0.1"), ("127.1.2.3", "127.1.2.3"), ("[::1]", "::1"), ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("localhost", "127.0.0.1"), ("LOCALHOST.", "127.0.0.1"), ("grafana.localhost", "127.0.0.1"),
    ("10.0.0.5", "0.0.0.0"), ("[fd00::5]", "::"), ("[::ffff:10.0.0.5]", "::"), ("node-1", "0.0.0.0"),
    ("localhost-1", "0.0.0.0"),
])
def test_the_bind_address_of_an_announced_host(host: str, bound: str) -> None:
    from services.metrics import bind_address

    assert bind_address(host) == bound


def test_a_run_withdraws_only_its_own_members_announcements(tmp_path: Path) -> None:
    # Two runs on one node with a member of the same id; run B killed its member, whose file stayed.
    run_a = serve_metrics(Metrics(), role="rollout_worker", instance="rollout_worker-0.0", discovery_dir=tmp_path,
                          bind="127.0.0.1", run="run-a")
    run_b = serve_metrics(Metrics(), role="rollout_worker", instance="rollout_worker-0.0", discovery_dir=tmp_path,
                          bind="127.0.0.1", run="run-b")
    other = serve_metrics(Metrics(), role="rollout_worker", instance="rollout_worker-0.01", discovery_dir=tmp_path,
                          bind="127.0.0.1", run="run-b")
    longer = serve_metrics(Metrics(), role="rollout_worker", instance="rollout_worker-0.0", discovery_dir=tmp_path,
                           bind="127.0.0.1", run="run-b-2")  # a run whose name extends run B's
    try:
        assert withdraw_announcements(tmp_path, "rollout_worker", "rollout_worker-0.0", "run-b") == 1
        assert sorted(announced_targets(tmp_path)) == sorted(
            [run_a.discovery_file.name, other.discovery_file.name, longer.discovery_file.name])
        assert withdraw_announcements(tmp_path, "rollout_worker", "rollout_worker-0.0", "run-b") == 0
    finally:
        for endpoint in (run_a, run_b, other, longer):
            endpoint.close()


def test_a_starting_run_withdraws_every_announcement_its_killed_driver_left(tmp_path: Path) -> None:
    """A driver killed with SIGKILL leaves its members' files (down targets); the run started again in the same
    namespace removes them all, and no other run's, whatever their names."""
    left = [serve_metrics(Metrics(), role=role, instance=instance, discovery_dir=tmp_path, bind="127.0.0.1",
                          run="run-b") for role, instance in (("learner", "learner-0"), ("reward", "reward-0.0"))]
    kept = [serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=tmp_path, bind="127.0.0.1",
                          run=run) for run in ("run-a", "run-b-2")]
    (tmp_path / "notes.json").write_text("not a discovery file")
    try:
        assert all(json.loads(e.discovery_file.read_text())[0]["labels"]["run"] == "run-b" for e in left)
        assert withdraw_run_announcements(tmp_path, "run-b") == 2
        assert sorted(path.name for path in tmp_path.glob("*.json")) == sorted(
            [e.discovery_file.name for e in kept] + ["notes.json"])
    finally:
        for endpoint in left + kept:
            endpoint.close()


def test_a_discovery_dir_that_cannot_be_created_names_the_setting_and_the_reason(tmp_path: Path, monkeypatch) -> None:
    """Was `[Errno 17] File exists: ...` (or the like) from a role, naming no setting; and the metrics server had
    started already, its thread left behind."""
    import threading

    monkeypatch.delenv("REFINE_METRICS_DISCOVERY_DIR", raising=False)
    blocker = tmp_path / "taken"
    blocker.write_text("")
    threads = threading.active_count()
    with pytest.raises(ValueError, match=rf"^service.metrics_discovery_dir='{blocker}': it is a file, not a "
                                         rf"directory"):
        serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=blocker, bind="127.0.0.1")
    assert threading.active_count() == threads
    with pytest.raises(ValueError, match=rf"^service.metrics_discovery_dir='{blocker}/a/b': {blocker} is a file"):
        prepare_discovery_dir(blocker / "a" / "b")
    if Path("/proc/self").exists():  # a virtual file system: no directory can be made in it
        with pytest.raises(ValueError, match=r"^service.metrics_discovery_dir='/proc/refine-test/x': cannot create "
                                             r"the directory: \S.*\(/proc/refine-test\)$"):
            prepare_discovery_dir("/proc/refine-test/x")
    assert prepare_discovery_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()


def test_a_discovery_dir_of_another_user_that_refuses_files_is_refused_naming_the_setting(tmp_path: Path) -> None:
    """A shared node's /tmp/refine-prometheus made by another user (mode 755) exists, so creating it succeeds: the
    roles' announcements would fail after Ray started, with a bare permission error."""
    shared = tmp_path / "prometheus"
    shared.mkdir()
    shared.chmod(0o555)
    result = _as_another_user("from services.metrics import prepare_discovery_dir\n"
                              "try:\n    prepare_discovery_dir(%r)\nexcept ValueError as error:\n    print(error)\n"
                              % str(shared))
    assert result.stdout.strip() == (f"service.metrics_discovery_dir='{shared}': cannot write files in it: "
                                     f"Permission denied"), result.stdout
    assert not list(shared.iterdir())  # the check leaves nothing behind


@pytest.mark.parametrize("value,problem", [
    ("999.1.1.1", "not an IPv4 address (four numbers in 0..255, such as 10.0.0.5)"),
    ("1.2.3", "not an IPv4 address"),
    ("not a host!", "not an IP address or a host name (letters, digits, '-' and '.')"),
    ("http://node-1", "not an IP address or a host name"),
    ("[10.0.0.5]", "not an IP address or a host name"),
    ("10.0.0.5:9100", "it holds a port (:9100); give the host alone: every process serves on a port of its own"),
    ("node-1:9100", "it holds a port (:9100)"),
    ("[fd00::5]:9100", "it holds a port (:9100)"),
    ("0.0.0.0", "that is the address a server binds to listen on every interface; no scraper reaches it there"),
])
def test_a_metrics_host_that_is_no_host_is_refused_naming_the_variable_before_serving(
    tmp_path: Path, monkeypatch, value: str, problem: str
) -> None:
    """Was announced as it came ('999.1.1.1:PORT', 'not a host!:PORT', '[10.0.0.5:9100]:PORT'): Prometheus showed
    the target down, or dropped the discovery file, and nothing named REFINE_METRICS_HOST."""
    import threading

    monkeypatch.setenv("REFINE_METRICS_HOST", value)
    threads = threading.active_count()
    with pytest.raises(ValueError) as info:
        serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=tmp_path, bind="127.0.0.1")
    assert str(info.value).startswith(
        f"REFINE_METRICS_HOST={value!r} (the address Prometheus reaches this node's metrics at): {problem}")
    assert threading.active_count() == threads and announced_targets(tmp_path) == {}  # nothing served or announced


@pytest.mark.parametrize("value,target", [
    ("node-1.cluster.local", "node-1.cluster.local"), (" 10.0.0.5 ", "10.0.0.5"), ("fd00::5", "[fd00::5]"),
    ("[fd00::5]", "[fd00::5]"), ("refine_ray-head_1", "refine_ray-head_1"), ("", "127.0.0.1"),
])
def test_a_metrics_host_that_is_a_host_or_address_is_announced(tmp_path: Path, monkeypatch, value: str,
                                                                target: str) -> None:
    monkeypatch.setenv("REFINE_METRICS_HOST", value)
    assert metrics_host() == target
    endpoint = serve_metrics(Metrics(), role="learner", instance="learner-0", discovery_dir=tmp_path, bind="127.0.0.1")
    try:
        assert list(announced_targets(tmp_path).values()) == [[f"{target}:{endpoint.port}"]]
    finally:
        endpoint.close()


def test_an_empty_discovery_dir_variable_leaves_the_run_config_its_default(monkeypatch) -> None:
    """The run config's service.metrics_discovery_dir read the variable too: "" became the driver's working
    directory, where Prometheus never looks."""
    from refine.config import BUILT_IN_DISCOVERY_DIR, ServiceConfig

    monkeypatch.setenv("REFINE_METRICS_DISCOVERY_DIR", "")
    assert ServiceConfig().metrics_discovery_dir == BUILT_IN_DISCOVERY_DIR
    monkeypatch.setenv("REFINE_METRICS_DISCOVERY_DIR", "/srv/discovery")  # set after the import: read per config
    assert ServiceConfig().metrics_discovery_dir == "/srv/discovery"


def test_the_built_in_discovery_dir_is_made_shared_as_tmp_is(tmp_path: Path, monkeypatch) -> None:
    """/tmp/refine-prometheus was made 0755 by the first user's run: every other user's default run was refused."""
    import services.metrics

    shared = tmp_path / "refine" / "prometheus"
    monkeypatch.setattr(services.metrics, "BUILT_IN_DISCOVERY_DIR", str(shared))
    assert prepare_discovery_dir(shared) == shared
    assert (shared.stat().st_mode & 0o7777, shared.parent.stat().st_mode & 0o7777) == (0o1777, 0o1777)
    assert tmp_path.stat().st_mode & 0o7777 != 0o1777  # a folder that was there already is left as it is
    own = tmp_path / "mine" / "prometheus"  # a folder the user named is theirs
    prepare_discovery_dir(own)
    assert own.stat().st_mode & 0o1000 == 0 and own.stat().st_mode & 0o022 == 0o022 & ~_umask()
    # Another user writes there (root without its capabilities stands for one: the folder is not theirs).
    os.chown(shared, 65534, 65534)
    _as_another_user("from services.metrics import prepare_discovery_dir\nprepare_discovery_dir(%r)\n" % str(shared))


def _as_another_user(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a Python that has no rights over files it does not own (checked to exit 0): root writes
    anywhere, so as root it runs without capabilities, as another user has none over the folder."""
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux) is needed to run this check as root without capabilities")
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_built_in_discovery_dir_shadows_no_package_of_the_project(tmp_path: Path) -> None:
    """Python run from the discovery dir's root (a node's /tmp: `ray start` there gives its workers that working
    directory) imports a folder there named like one of the project's packages as a namespace package before an
    editable install's own: /tmp/refine/prometheus made `import refine.config` fail there."""
    from refine.config import BUILT_IN_DISCOVERY_DIR

    root = Path(BUILT_IN_DISCOVERY_DIR).parents[-2]  # /tmp
    mirrored = tmp_path / Path(BUILT_IN_DISCOVERY_DIR).relative_to(root)
    mirrored.mkdir(parents=True)
    check = ("from services.source_digest import package_folders\nimport refine.config\n"
             "print(sorted(str(folder.parent) for folder in package_folders().values()))")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                            env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    assert str(tmp_path) not in result.stdout
