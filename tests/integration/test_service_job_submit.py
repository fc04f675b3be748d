"""`ray job submit -- refine train ...` against a real Ray head started for this test (service_helpers.start_ray_head)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_helpers import BIN, REPO, SERVICE_TINY, RayHead, start_ray_head, step_rows, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    with start_ray_head() as head:
        yield head


def test_ray_job_submit_runs_refine_train(ray_head, redis_url: str, tmp_path: Path) -> None:
    url, env = ray_head.dashboard_url, ray_head.env
    steps = 3
    entrypoint = ["refine", "train", str(SERVICE_TINY), "--no-progress", "--redis-url", redis_url,
                  "--set", f"train.steps={steps}"]
    for item in tiny_overrides(tmp_path):
        entrypoint += ["--set", item]
    # As README submits it: the checkout uploaded as the job's working directory, where its actors import from.
    result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
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
    # RAY_TMPDIR: where that cluster's address lies, as /tmp/ray holds another user's.
    env = dict(ray_head.env, RAY_TMPDIR=ray_head.temp_root)
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
