"""What a service run's shutdown (services.orchestrator `_shutdown`) leaves behind, on a real Redis and without Ray."""

from __future__ import annotations

import pytest
import ray

from learner.learner import MEMBER_ID, ROLE
from refine.config import load_config
from services.metrics import Metrics, serve_metrics
from services.orchestrator import Orchestrator


class RayAborted(BaseException):
    """What Ray's core does to a driver whose cluster is gone: it ends the process, no Python handler runs."""


def test_prometheus_targets_are_withdrawn_before_any_call_to_ray(tmp_path, redis_url, namespace, monkeypatch):
    """A SIGTERM to the whole process group (timeout, systemd, Slurm) ends a local Ray with the driver, and the
    shutdown's first Ray call then aborts the process: a target still announced stayed down for good, and
    RefineRoleDown fired for it."""
    discovery = tmp_path / "prometheus"
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                       f"service.metrics_discovery_dir={discovery}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
    orchestrator.endpoint = serve_metrics(orchestrator.metrics, role="orchestrator", instance=namespace,
                                          discovery_dir=discovery, bind="127.0.0.1", run=namespace)
    learner = serve_metrics(Metrics(), role=ROLE, instance=MEMBER_ID, discovery_dir=discovery, bind="127.0.0.1",
                            run=namespace)  # a learner Ray could no longer kill, as the learner announces itself
    orchestrator.learner = object()  # an actor handle: the shutdown kills it through Ray

    def aborts(*args, **kwargs):
        raise RayAborted

    monkeypatch.setattr(ray, "kill", aborts)
    try:
        assert len(list(discovery.glob("*.json"))) == 2
        with pytest.raises(RayAborted):
            orchestrator._shutdown()
        assert list(discovery.glob("*.json")) == []
    finally:
        learner.close()
        orchestrator.client.close()
