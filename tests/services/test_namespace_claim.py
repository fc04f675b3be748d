"""Whether a run that goes on holds a Redis namespace (services.namespace_claim): a driver of another user counts
as alive, and a claim no run made is named with how to remove it (real Redis; nothing of Ray starts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from refine.config import RunConfig
from services.broker import Broker
from services.failures import ServiceError
from services.namespace_claim import check_namespace_free, claim_ttl_s, current_pid_namespace


def _holder(pid: int, host: str | None = None, pid_namespace: str | None = None) -> str:
    return json.dumps({"out_dir": "/runs/a", "host": host or socket.gethostname(), "pid": pid,
                       "pid_namespace": current_pid_namespace() if pid_namespace is None else pid_namespace,
                       "started": "2026-12-06 10:00:00 UTC", "id": "0" * 32})


TTL_S = claim_ttl_s(RunConfig())


def test_a_driver_of_another_user_counts_as_alive(redis_url: str, broker: Broker, namespace: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """os.kill(pid, 0) on another user's process raises PermissionError: the process runs, so does its run."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert broker.claim(_holder(other.pid), ttl_s=30) is None
        real_kill = os.kill

        def kill(pid: int, signal: int) -> None:
            if pid == other.pid:
                raise PermissionError(1, "Operation not permitted")
            real_kill(pid, signal)

        with monkeypatch.context() as patch, pytest.raises(
                ServiceError, match=rf"its driver pid {other.pid} on {socket.gethostname()}"):
            patch.setattr(os, "kill", kill)
            check_namespace_free(redis_url, namespace, TTL_S)
    finally:
        other.kill()
        other.wait()


def test_a_claim_no_run_made_is_named_with_how_to_remove_it(redis_url: str, broker: Broker, namespace: str) -> None:
    broker.client.set(broker.key("claim"), b"hello")  # no TTL: nothing would ever free it
    with pytest.raises(ServiceError, match=rf"holds a claim no run made \({namespace}:claim = 'hello'\): if no run "
                                           rf"uses this namespace, delete it \(`redis-cli DEL {namespace}:claim`\)"):
        check_namespace_free(redis_url, namespace, TTL_S)
