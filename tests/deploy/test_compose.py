"""docker-compose.yml: valid against the Compose Specification, and wired the way the service needs.

No Docker engine is needed: the file is validated with check-jsonschema's vendored compose-spec schema,
then read as YAML and checked against the other deployment files and the service's defaults.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from refine.config import ServiceConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = REPO_ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus.yml"
DATASOURCES = REPO_ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = REPO_ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "refine.yml"

REDIS_PORT = 6379


def validate_with_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume or a host path) of a service's short-syntax volumes."""
    result = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        result[target] = source
    return result


def command_text(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def flag_value(command: str, flag: str) -> str:
    match = re.search(rf"{re.escape(flag)}[= ](\S+)", command)
    assert match, f"{flag} not in command {command!r}"
    return match.group(1)


def test_compose_file_matches_the_compose_spec() -> None:
    result = validate_with_compose_spec(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_spec_check_rejects_a_misspelled_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("\n  redis:\n", "\n  redis:\n    imagee: redis:7\n", 1))
    result = validate_with_compose_spec(broken)
    assert result.returncode != 0
    assert "imagee" in result.stdout + result.stderr


def test_the_five_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"ray-head", "ray-worker", "redis", "prometheus", "grafana"}


def test_published_ports_listen_on_this_host_only(compose: dict[str, Any]) -> None:
    """The job API runs any command and Grafana starts as admin/admin: published on every interface, anyone who
    reaches the machine could use them."""
    published = [(name, port) for name, service in compose["services"].items() for port in service.get("ports", [])]
    assert published, "the mini-cluster publishes its UIs"
    assert all(str(port).startswith("127.0.0.1:") for _, port in published), published


def test_redis_persists_with_append_only_file_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in command_text(redis)
    volume = mounts(redis)["/data"]
    assert volume in compose["volumes"], f"redis' /data is not a named volume: {volume!r}"


def test_ray_gcs_port_is_not_redis_port(compose: dict[str, Any]) -> None:
    head = command_text(compose["services"]["ray-head"])
    worker = command_text(compose["services"]["ray-worker"])
    assert "ray start --head" in head
    gcs_port = int(flag_value(head, "--port"))
    assert gcs_port != REDIS_PORT
    assert flag_value(worker, "--address") == f"ray-head:{gcs_port}"
    assert flag_value(head, "--dashboard-port") == "8265"
    assert "127.0.0.1:8265:8265" in compose["services"]["ray-head"]["ports"]


def test_ray_nodes_run_the_project_image_against_compose_redis(compose: dict[str, Any]) -> None:
    for name in ("ray-head", "ray-worker"):
        node = compose["services"][name]
        assert (REPO_ROOT / node["build"]["context"] / node["build"]["dockerfile"]).is_file(), name
        assert node["environment"]["REFINE_REDIS_URL"] == f"redis://redis:{REDIS_PORT}/0", name
        assert node["depends_on"]["redis"]["condition"] == "service_healthy", name
        # The announced metrics host must be an address the prometheus container can reach, not loopback.
        command = command_text(node)
        assert "REFINE_METRICS_HOST=" in command, name
        assert command.index("REFINE_METRICS_HOST=") < command.index("ray start"), name
        assert "--block" in shlex.split(command.split("ray start", 1)[1]), f"{name}: ray start must stay in front"


def test_prometheus_reads_the_discovery_dir_the_roles_write(compose: dict[str, Any]) -> None:
    services = compose["services"]
    default_dir = ServiceConfig().metrics_discovery_dir
    prometheus_config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    globs = [pattern for job in prometheus_config["scrape_configs"] for sd in job.get("file_sd_configs", [])
             for pattern in sd["files"]]
    assert globs == [f"{default_dir}/*.json"]

    volume = mounts(services["ray-head"])[default_dir]
    assert volume in compose["volumes"]
    assert mounts(services["ray-worker"])[default_dir] == volume
    assert mounts(services["prometheus"])[default_dir] == volume
    for name in ("ray-head", "ray-worker"):
        assert services[name]["environment"]["REFINE_METRICS_DISCOVERY_DIR"] == default_dir


def test_prometheus_runs_the_deployed_config(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    config_path = flag_value(command_text(prometheus), "--config.file")
    assert mounts(prometheus)[config_path] == "./deploy/prometheus.yml"
    assert "127.0.0.1:9090:9090" in prometheus["ports"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    grafana_mounts = mounts(grafana)
    assert grafana_mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert grafana_mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert (REPO_ROOT / "deploy" / "grafana" / "dashboards" / "refine.json").is_file()

    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    host, port = datasource["url"].removeprefix("http://").split(":")
    assert host in compose["services"]
    assert int(port) == 9090  # Prometheus' port inside the compose network
    assert "127.0.0.1:3000:3000" in grafana["ports"]


def test_every_host_path_and_named_volume_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name}: bind mount source {source} for {target} is missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source!r} is not declared"
