"""A run's claim on its Redis namespace: a run in a namespace that a run going on holds (the same train.out_dir
started twice, one service.namespace given to two runs) is refused before it touches anything of that run's; a
driver killed without cleaning up frees it at once for a run on its host (real Redis; nothing of Ray starts)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from refine.config import RunConfig
from services.broker import Broker
from services.failures import ServiceError
from services.namespace_claim import check_namespace_free
from services.orchestrator import Orchestrator
from test_namespace_claim import TTL_S, _holder


def test_a_run_is_refused_while_a_driver_that_goes_on_holds_its_namespace(
    redis_url: str, broker: Broker, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def went_on(*args: object) -> None:  # fail here, not hang in a run that never gets its roles
        raise AssertionError("the run went on past its claim")

    monkeypatch.setattr("services.orchestrator.withdraw_run_announcements", went_on)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the other run's driver
    try:
        assert broker.claim(_holder(other.pid), ttl_s=30) is None
        broker.client.set(broker.key("published"), b"7")  # a key of the other run's
        message = (rf"the Redis namespace '{namespace}' \(service.namespace, else derived from train.out_dir\) is in "
                   rf"use by a run that is going on: train.out_dir='/runs/a', its driver pid {other.pid} on "
                   rf"{socket.gethostname()}, started 2026-12-06 10:00:00 UTC\. Two runs in one namespace")
        with pytest.raises(ServiceError, match=message):
            check_namespace_free(redis_url, namespace, TTL_S)  # before Ray starts
        # The same train.out_dir started twice: another service.namespace would not keep the runs apart (it led
        # to two runs in one directory), so only another train.out_dir is advised.
        with pytest.raises(ServiceError) as refused:
            check_namespace_free(redis_url, namespace, TTL_S, "/runs/a")
        assert "give this run its own train.out_dir (that run trains into this one" in str(refused.value)
        assert "or service.namespace" not in str(refused.value)
        with pytest.raises(ServiceError, match="give this run its own train.out_dir or service.namespace"):
            check_namespace_free(redis_url, namespace, TTL_S, "/runs/b")
        config = RunConfig(train={"out_dir": str(tmp_path / "b")},
                           service={"metrics_discovery_dir": str(tmp_path / "prometheus")})
        orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
        try:
            with pytest.raises(ServiceError, match=message):
                orchestrator.run()  # the claim itself, for a run that passed the check before the other started
        finally:
            orchestrator.client.close()
        assert broker.client.get(broker.key("published")) == b"7"  # nothing of the other run's deleted
        assert not (tmp_path / "prometheus").exists() and broker.claimed_by() == _holder(other.pid)
    finally:
        other.kill()
        other.wait()
    check_namespace_free(redis_url, namespace, TTL_S)  # its driver is gone from this host: free at once
    broker.take_over(_holder(other.pid, host="another-node"), ttl_s=30)  # gone from another node: cannot tell
    with pytest.raises(ServiceError, match=r"its driver pid \d+ on another-node"):
        check_namespace_free(redis_url, namespace, TTL_S)
    # A container sharing this host's name but not its pids (--net=host): its pid says nothing here.
    broker.take_over(_holder(other.pid, pid_namespace="4026531999"), ttl_s=30)
    with pytest.raises(ServiceError, match=rf"frees it {TTL_S:.0f}s after its last renewal"):
        check_namespace_free(redis_url, namespace, TTL_S)


def test_a_driver_whose_claim_another_run_took_leaves_that_runs_keys_alone(
    redis_url: str, broker: Broker, namespace: str, tmp_path: Path
) -> None:
    config = RunConfig(train={"out_dir": str(tmp_path / "a")},
                       service={"metrics_discovery_dir": str(tmp_path / "prometheus")})
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
    try:
        orchestrator._claim_namespace()
        assert orchestrator.claim_ttl_s == TTL_S > 60  # longer than the Redis outage the run rides out
        broker.take_over(_holder(os.getppid()), ttl_s=30)  # its claim lapsed (cut off from Redis); run b took it
        broker.client.set(broker.key("published"), b"3")  # run b's
        with pytest.raises(ServiceError, match=r"was taken by another run .* leaving that run's keys alone"):
            orchestrator._renew_claim()
        orchestrator._shutdown()  # its ending: no stop flag, nothing deleted, the claim stays b's
        assert broker.client.get(broker.key("published")) == b"3"
        assert broker.stop_requested() is None and broker.claimed_by() == _holder(os.getppid())
    finally:
        orchestrator.client.close()


def test_a_claim_of_a_driver_of_this_process_that_ended_is_taken_over(
    redis_url: str, broker: Broker, namespace: str, tmp_path: Path
) -> None:
    broker.take_over(_holder(os.getpid()), ttl_s=30)  # a run of this process that ended without giving it up
    check_namespace_free(redis_url, namespace, TTL_S)
    config = RunConfig(train={"out_dir": str(tmp_path / "b")},
                       service={"metrics_discovery_dir": str(tmp_path / "prometheus")})
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
    try:
        orchestrator._claim_namespace()
        assert broker.claimed_by() == orchestrator.claim_holder
        # While it holds the claim, another run of this process (a thread) is refused.
        with pytest.raises(ServiceError, match="is in use by a run that is going on"):
            check_namespace_free(redis_url, namespace, TTL_S)
        assert orchestrator._release_namespace() and broker.claimed_by() is None
    finally:
        orchestrator.client.close()
