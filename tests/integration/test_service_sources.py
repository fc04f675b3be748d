"""A driver started outside `ray job submit --working-dir` whose actors import another copy of the project (the one
installed on the cluster's nodes): the run is refused as it starts, naming both copies, instead of mixing two
versions of the code."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from service_helpers import BIN, REPO, SERVICE_TINY, start_ray_head, tiny_overrides
from services.source_digest import PROJECT_PACKAGES, source_digest

pytestmark = pytest.mark.slow


def test_actors_importing_another_copy_of_the_project_refuse_the_run(redis_url: str, tmp_path: Path) -> None:
    installed = tmp_path / "installed"  # the project as the nodes have it: one comment off the driver's checkout
    for name in PROJECT_PACKAGES:
        shutil.copytree(REPO / name, installed / name, ignore=shutil.ignore_patterns("__pycache__"))
    with (installed / "services" / "messages.py").open("a") as file:
        file.write("# an edit the driver's checkout lacks\n")
    command = [str(BIN / "refine"), "train", str(SERVICE_TINY), "--no-progress", "--redis-url", redis_url,
               "--set", "train.steps=1"]
    for item in tiny_overrides(tmp_path):
        command += ["--set", item]
    with start_ray_head(node_env={"PYTHONPATH": str(installed)}) as head:
        # This head requires Ray's token authentication: a driver not set up for it is refused at once, naming the
        # settings (ray.init printed "token is missing" for about 20 s, then "Failed to connect").
        no_token = {key: value for key, value in head.env.items() if not key.startswith("RAY_AUTH_")}
        refused = subprocess.run(command + ["--ray-address", head.gcs_address], cwd=tmp_path, env=no_token,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, refused.stderr[-4000:]
        assert refused.stderr.endswith(
            f"refine: error: Ray at '{head.gcs_address}' (--ray-address) requires Ray's token authentication "
            f"(InvalidAuthToken: Authentication token is missing or incorrect): set RAY_AUTH_MODE=token, with the "
            f"cluster's token in RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH names, or in ~/.ray/auth_token\n"
        ), refused.stderr[-4000:]
        # The driver imports the checkout, started in another folder: a driver's working directory comes first on
        # its actors' import path (on one machine the checkout's would be found there).
        result = subprocess.run(command + ["--ray-address", head.gcs_address], cwd=tmp_path,
                                env=head.env | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    host = socket.gethostname()
    actor = source_digest({name: installed / name for name in PROJECT_PACKAGES})[:12]
    driver = source_digest({name: REPO / name for name in PROJECT_PACKAGES})[:12]
    error = (f"refine: error: the learner failed to start: this actor imports the project from {host}:{installed} "
             f"(sources {actor}), but the run's driver from {host}:{REPO} (sources {driver}): two versions of the "
             f"code, which can disagree on the messages between roles, the algorithm or the checkpoint format. Submit "
             f"the run with `ray job submit --working-dir .` from the driver's checkout (its actors then import that "
             f"copy), or install the same version of the project on every node (a local Ray's actors import from "
             f"the driver's working directory first: start the run from elsewhere)\n")
    assert result.stderr.endswith(error), output[-4000:]
    assert output.count("refine: error:") == 1
    assert "restarted as" not in output  # a start-up failure, not a crash to retry
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing trained
