"""A service run refuses a run directory another process trains into, before Ray or Redis start."""

from __future__ import annotations

from pathlib import Path

import pytest

import services.orchestrator
from refine.config import load_config
from refine.run_lock import RunDirectoryInUse, run_directory_lock
from services.orchestrator import run

REPO = Path(__file__).resolve().parents[2]


def test_a_service_run_beside_another_run_in_its_directory_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """A service run and a --local run on one train.out_dir: the local run finished, the service run died at
    step 13, and config.yaml, metrics.jsonl and the checkpoint were the local run's."""
    config = load_config(REPO / "configs" / "service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                                  f"service.metrics_discovery_dir={tmp_path / 'prom'}"])

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run refused before it")

    monkeypatch.setattr(services.orchestrator, "ray_for_run", no_ray)
    with run_directory_lock(tmp_path / "run", "refine train --local"):
        with pytest.raises(RunDirectoryInUse, match=r"is in use by another run \(`refine train --local`, pid"):
            run(config, progress=False)
    assert not (tmp_path / "run").exists()
