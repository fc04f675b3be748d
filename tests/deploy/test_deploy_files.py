"""The other deployment files: Prometheus config (promtool), Ray cluster example (Ray's schema), Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin:/usr/local/bin")
    if promtool is None:
        pytest.skip("promtool not found (it ships with the prometheus package: apt-get install -y prometheus)")
    result = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ray_cluster_example_passes_rays_schema() -> None:
    config = yaml.safe_load((DEPLOY / "ray" / "local-cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    head = " ".join(prepared["head_start_ray_commands"])
    workers = " ".join(prepared["worker_start_ray_commands"])
    gcs_port = re.search(r"ray start --head .*--port=(\d+)", head).group(1)
    assert gcs_port != "6379"
    assert f"--address=$RAY_HEAD_IP:{gcs_port}" in workers
    for commands in (head, workers):
        assert "REFINE_REDIS_URL=" in commands and "REFINE_METRICS_HOST=" in commands


def test_ray_cluster_schema_check_rejects_unknown_fields() -> None:
    config = yaml.safe_load((DEPLOY / "ray" / "local-cluster.yaml").read_text())
    config["head_start_commands"] = ["a misspelled field"]
    with pytest.raises(Exception, match="head_start_commands"):
        validate_config(prepare_config(config))


def test_dockerfile_installs_cpu_torch_then_the_project() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.MULTILINE)
    torch = re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url (\S+)', dockerfile)
    assert torch and torch.group(1).endswith("/whl/cpu")
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", dockerfile, re.MULTILINE)
    assert torch.start() < dockerfile.index("pip install /opt/refine")
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def test_dockerfile_pins_the_ray_of_the_project() -> None:
    """`ray job submit` needs the client's Ray to be the cluster's: the image and the cluster example pin one Ray,
    within pyproject.toml's bound, and install exactly it. (Not compared with this venv's Ray: a fresh install may
    resolve a newer one, which README tells users to match.)"""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pin = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert pin, "deploy/Dockerfile pins no Ray (ARG RAY_VERSION=...)"
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = [requirement for requirement in map(Requirement, dependencies) if requirement.name == "ray"]
    assert len(declared) == 1 and "default" in declared[0].extras
    assert declared[0].specifier.contains(pin.group(1)), (str(declared[0]), pin.group(1))
    # Ray before the project, and again with it: pip then keeps the pinned version.
    ray_alone = dockerfile.index('RUN pip install "ray[default]==${RAY_VERSION}"')
    assert ray_alone < dockerfile.index('RUN pip install /opt/refine "ray[default]==${RAY_VERSION}"')
    # The Ray cluster launcher's nodes install the same Ray with the project.
    setup = yaml.safe_load((DEPLOY / "ray" / "local-cluster.yaml").read_text())["setup_commands"]
    assert any(command.endswith(f'pip install -q -e ~/refine "ray[default]=={pin.group(1)}"') for command in setup), setup


def test_the_image_copies_the_example_configs_from_a_real_folder() -> None:
    """The runtime stage's /opt/refine/configs (deploy/README.md's commands) comes from the package's folder of
    examples, not from the checkout's configs/: that is a relative symlink, and a builder that copied it as a link
    (BuildKit follows it) would leave it dangling in a stage without /opt/refine/refine."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = re.search(r"^COPY --from=builder /opt/refine/(\S+) /opt/refine/configs$", dockerfile, re.MULTILINE)
    assert copied, "deploy/Dockerfile copies no example configs to /opt/refine/configs"
    source = REPO_ROOT / copied.group(1)
    assert source.is_dir() and not source.is_symlink(), source
    examples = {path.name for path in (REPO_ROOT / "configs").glob("*.yaml")}
    assert {path.name for path in source.glob("*.yaml")} == examples
