"""A service run's claim on its Redis namespace: which namespace a run uses, how long a driver's claim on it lasts,
and whether a run that goes on holds it (two runs in one namespace delete each other's state)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from refine.config import RunConfig
from services.broker import Broker
from services.failures import ServiceError
from services.key_expiry import KEY_REFRESH_S
from services.redis_server import connect
from services.resilience import outage_timeout_s

__all__ = ["CLAIMS_HELD_HERE", "CLAIM_MARGIN_S", "DEFAULT_KEY_TTL_S", "check_key_ttl",
           "check_namespace_free", "claim_ttl_s", "current_pid_namespace", "describe_holder", "driver_is_gone",
           "key_ttl_s", "namespace_for", "namespace_in_use", "shortest_key_ttl_s"]

# The driver's claim on the run's Redis namespace lasts this much longer than the Redis outage every role rides out
# (outage_timeout_s) unless renewed (every housekeeping and start poll): a driver cut off from Redis gives the run
# up, its roles too, before its claim can lapse and let another run in. A second run in the namespace is refused
# while the claim holds; a driver killed without cleaning up frees it after claim_ttl_s (at once for a run on its
# host, which sees that the driver's process is gone).
CLAIM_MARGIN_S = 30.0
# Every other key of the run's namespace expires service.key_ttl_s (by default this, or the claim's TTL and a
# refresh's interval when longer) after it was last written (the roles' brokers write with that expiry) or refreshed
# by the driver (services.key_expiry): a driver killed without cleaning up (SIGKILL, a node lost) leaves streams and
# weights (gigabytes) in a shared Redis only that long. Nothing a resume needs lives only in Redis: a run starts from
# an empty namespace and its learner's checkpoint on disk (services/orchestrator.py, "Resume").
DEFAULT_KEY_TTL_S = 3600.0
# The claim ids of this process's runs that go on (runs on threads: tests, notebooks).
CLAIMS_HELD_HERE: set[str] = set()


def namespace_for(config: RunConfig, out_dir: Path) -> str:
    """The Redis key prefix: configured, or derived from the run directory."""
    if config.service.namespace:
        return config.service.namespace
    return "refine-" + hashlib.sha1(str(out_dir).encode()).hexdigest()[:12]


def claim_ttl_s(config: RunConfig) -> float:
    """How long a driver's claim on its namespace lasts unless renewed (see CLAIM_MARGIN_S)."""
    return outage_timeout_s(config.service.heartbeat_timeout_s) + CLAIM_MARGIN_S


def key_ttl_s(config: RunConfig) -> float:
    """How long the run's keys outlive their last write or refresh (service.key_ttl_s, see DEFAULT_KEY_TTL_S)."""
    if config.service.key_ttl_s is not None:
        return config.service.key_ttl_s
    return max(DEFAULT_KEY_TTL_S, shortest_key_ttl_s(config))


def shortest_key_ttl_s(config: RunConfig) -> float:
    """The claim's TTL and a refresh's interval: the keys of a driver that stalls (suspended, cut off from Redis)
    then outlive its claim, refreshed as late as they may be."""
    return claim_ttl_s(config) + KEY_REFRESH_S


def check_key_ttl(config: RunConfig) -> None:
    """Refuse a service.key_ttl_s below `shortest_key_ttl_s`: the keys of a driver that still holds its namespace (a
    Redis outage it rides out, a slow stop) would expire under it."""
    given, shortest = config.service.key_ttl_s, shortest_key_ttl_s(config)
    if given is not None and given < shortest:
        raise ValueError(f"service.key_ttl_s={given:g} is shorter than the run's claim on its Redis namespace and a "
                         f"refresh of its keys' expiry ({shortest:.0f}s: max(60, 4 x service.heartbeat_timeout_s="
                         f"{config.service.heartbeat_timeout_s:g}) + {CLAIM_MARGIN_S:.0f}, plus "
                         f"{KEY_REFRESH_S:.0f}): a driver that still holds its namespace would lose its keys; set it "
                         f"to {shortest:.0f} or more, or leave it out")


def check_namespace_free(redis_url: str, namespace: str, ttl_s: float, out_dir: str | None = None) -> None:
    """Refuse, before Ray starts, a run (into `out_dir`) whose Redis namespace a run that is going on holds (see
    Orchestrator._claim_namespace, which claims it)."""
    client = connect(redis_url)
    try:
        other = Broker(client, namespace).claimed_by()
    finally:
        client.close()
    if other is not None and not driver_is_gone(other):
        raise namespace_in_use(namespace, other, ttl_s, out_dir)


def namespace_in_use(namespace: str, other: str, ttl_s: float, out_dir: str | None = None) -> ServiceError:
    """The refusal of a run (into `out_dir`) whose namespace `other` holds."""
    if not _holder(other):  # not a driver's claim: nothing will renew it or let it lapse
        return ServiceError(f"the Redis namespace {namespace!r} (service.namespace, else derived from train.out_dir) "
                            f"holds a claim no run made ({namespace}:claim = {other[:200]!r}): if no run uses this "
                            f"namespace, delete it (`redis-cli DEL {namespace}:claim`), or give this run its own "
                            f"train.out_dir or service.namespace")
    return ServiceError(f"the Redis namespace {namespace!r} (service.namespace, else derived from train.out_dir) is in "
                        f"use by a run that is going on: {describe_holder(other)}. Two runs in one namespace delete "
                        f"each other's state, so this one does not start: wait for that run to end, or give this run "
                        f"{_own_place(other, out_dir)} (a driver killed without cleaning up frees it "
                        f"{ttl_s:.0f}s after its last renewal, at once for a run on its host)")


def _own_place(other: str, out_dir: str | None) -> str:
    """What keeps a run apart from the holder of its namespace: another service.namespace only where their run
    directories differ already (one directory takes one run at a time: refine.run_lock)."""
    if out_dir is not None and _holder(other).get("out_dir") == str(out_dir):
        return ("its own train.out_dir (that run trains into this one: another service.namespace would not keep "
                "it apart)")
    return "its own train.out_dir or service.namespace"


def _holder(description: str) -> dict:
    """A namespace claim's holder (Orchestrator.claim_holder), or {} for one this code did not write."""
    try:
        holder = json.loads(description)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) and "id" in holder else {}


def current_pid_namespace() -> str:
    """This process's PID namespace (Linux; "" elsewhere): a pid names the same process only within one, and
    containers sharing a host name (`--net=host`) may each have their own."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def describe_holder(description: str) -> str:
    holder = _holder(description)
    if not holder:
        return f"claimed as {description[:200]!r}"
    return (f"train.out_dir={holder.get('out_dir')!r}, its driver pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')}")


def driver_is_gone(description: str) -> bool:
    """Whether a claim's holder is a driver process on this host that no longer runs (killed without cleaning up),
    or a run of this very process that ended without giving the claim up."""
    holder = _holder(description)
    pid = holder.get("pid")
    if (holder.get("host") != socket.gethostname() or holder.get("pid_namespace") != current_pid_namespace()
            or not isinstance(pid, int) or isinstance(pid, bool) or pid < 1):
        return False
    if pid == os.getpid():  # a run on another thread of this process holds it while it goes on
        return holder.get("id") not in CLAIMS_HELD_HERE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False
