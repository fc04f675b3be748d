"""The paths a service run hands its actors (services.orchestrator._absolute_paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from refine.config import BUILT_IN_DISCOVERY_DIR, load_config
from services.orchestrator import _absolute_paths


def test_a_deployments_discovery_dir_replaces_the_built_in_one_named_or_defaulted(tmp_path, monkeypatch):
    """configs/service_tiny.yaml names the built-in path, as a saved config.yaml does: the deployment's
    REFINE_METRICS_DISCOVERY_DIR (docker-compose, a cluster's nodes) must still apply to it."""
    deployed = tmp_path / "shared-discovery"
    monkeypatch.setenv("REFINE_METRICS_DISCOVERY_DIR", str(deployed))
    named = load_config(None, [f"service.metrics_discovery_dir={BUILT_IN_DISCOVERY_DIR}"])
    assert _absolute_paths(named).service.metrics_discovery_dir == str(deployed)
    assert _absolute_paths(load_config(None, [])).service.metrics_discovery_dir == str(deployed)
    own = tmp_path / "my-discovery"  # a path of the config's own is kept
    chosen = load_config(None, [f"service.metrics_discovery_dir={own}"])
    assert Path(_absolute_paths(chosen).service.metrics_discovery_dir) == own



def test_every_path_a_resume_reads_is_made_absolute(tmp_path, monkeypatch):
    # config.yaml is written from these: a resume from another directory must find the same files.
    monkeypatch.chdir(tmp_path)
    for name in ("docs.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text('{"text": "a"}\n')
    config = _absolute_paths(load_config(None, ["data.source=docs.jsonl", "data.eval_source=heldout.jsonl",
                                                "train.out_dir=runs/r"]))
    assert (config.data.source, config.data.eval_source, config.train.out_dir) == (
        str(tmp_path / "docs.jsonl"), str(tmp_path / "heldout.jsonl"), str(tmp_path / "runs" / "r"))
    assert _absolute_paths(load_config(None, ["data.eval_source=synthetic"])).data.eval_source == "synthetic"


def test_a_service_run_refuses_data_that_it_writes_before_ray_or_redis_start(tmp_path, monkeypatch):
    """The service writes the same metrics.jsonl as the local loop (services.report_files): the same refusal, made
    before a Ray or a Redis is started (the path named absolute: the service makes every input path so)."""
    import ray

    from services.orchestrator import run

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "run" / "metrics.jsonl"
    data.parent.mkdir()
    data.write_text('{"text": "a document"}\n')
    config = load_config(None, ["train.out_dir=run", "data.source=run/metrics.jsonl", "train.mode=onepass"])
    ray_before = ray.is_initialized()  # another test of the session may have started one
    with pytest.raises(ValueError, match=rf"^data.source='{data}' is a file that this run writes \(train.out_dir="
                                         rf"'{tmp_path / 'run'}'\)"):
        run(config, progress=False)
    assert ray.is_initialized() == ray_before and data.read_text() == '{"text": "a document"}\n'
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
