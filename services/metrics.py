"""Prometheus metrics of every role, and how Prometheus finds them.

Every process (orchestrator, each rollout worker, each reward replica, the learner: rank 0) serves its
own registry on an ephemeral port, so any number of actors share a node without port collisions,
and announces itself with a file in Prometheus' file service-discovery format:
`<discovery_dir>/<role>-<instance>-<run>~<host>_<port>.json` (run: the service's namespace) =
[{"targets": ["host:port"], "labels": {"role": ..., "instance_id": ..., "node": ..., "run": ...}}].
The run and the target host:port in the name keep the files of two runs on one node apart (instance ids
such as `learner-0` repeat from run to run; the `run` label tells their series apart): each process
removes its own file when it stops, a run removes those of the members it killed
(`withdraw_announcements`), and a run starting removes every file its namespace's earlier driver left
when it was killed (`withdraw_run_announcements`).
deploy/prometheus.yml reads every such file (`file_sd_configs`). Metric names all start with `refine_`.
A process listens on the loopback address it announces unless REFINE_METRICS_HOST names a host that other
machines reach it at (`bind_address`): otherwise no other machine reads the run's metrics (the node's own
users still reach its loopback ports).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from refine.config import BUILT_IN_DISCOVERY_DIR, discovery_dir_problem, discovery_dir_setting
from refine.files import file_name_part, write_atomically

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


# The families each role sets (and exports). A colocated learner samples and scores its own rollouts:
# it sets COLOCATED_LEARNER_FAMILIES too.
ROLE_FAMILIES: dict[str, frozenset[str]] = {
    "orchestrator": frozenset({"documents", "stream_length", "stream_pending"}),
    "rollout_worker": frozenset({"rollouts", "rollout_tokens", "rollout_batches", "selected_entropy", "step_seconds",
                                 "weight_version"}),
    "reward": frozenset({"reward_mean", "reward_std", "reward_latency", "scored_batches"}),
    "learner": frozenset({"learner_steps", "learner_step", "policy_loss", "ntp_loss", "eval_ntp_loss",
                          "clip_fraction", "approx_kl", "grad_norm", "learning_rate", "data_epoch", "step_seconds",
                          "skipped_steps", "weight_version", "staleness", "stale_dropped"}),
}
COLOCATED_LEARNER_FAMILIES = frozenset({"rollouts", "rollout_tokens", "selected_entropy", "reward_mean", "reward_std"})
ALL_FAMILIES = frozenset().union(*ROLE_FAMILIES.values())


class Metrics:
    """Every metric family; one instance per process. `families` (ROLE_FAMILIES' of the process' role; None: all)
    are the ones it exports: the others exist, unregistered, so that a scrape shows no 0 for what another role
    measures (`avg(refine_ntp_loss)` would mix in every rollout worker's and reward replica's)."""

    def __init__(self, registry: CollectorRegistry | None = None, families: Collection[str] | None = None):
        self.registry = registry or CollectorRegistry()
        unknown = set(families or ()) - ALL_FAMILIES
        if unknown:
            raise ValueError(f"unknown metric families {sorted(unknown)}; known: {sorted(ALL_FAMILIES)}")
        self.families = frozenset(ALL_FAMILIES if families is None else families)

        def r(name: str) -> CollectorRegistry | None:
            return self.registry if name in self.families else None

        # Rollout workers
        self.rollouts = Counter("refine_rollouts", "Rollouts produced", registry=r("rollouts"))
        self.rollout_tokens = Counter("refine_rollout_tokens", "Rollout tokens produced",
                                      registry=r("rollout_tokens"))
        self.rollout_batches = Counter("refine_rollout_batches", "Rollout batches published",
                                       registry=r("rollout_batches"))
        self.selected_entropy = Gauge("refine_selected_entropy", "Mean entropy at selected positions",
                                      registry=r("selected_entropy"))
        # Reward service
        self.reward_mean = Gauge("refine_reward_mean", "Mean reward of the last batch", ["reward_type"],
                                 registry=r("reward_mean"))
        self.reward_std = Gauge("refine_reward_std", "Reward std of the last batch", ["reward_type"],
                                registry=r("reward_std"))
        self.reward_latency = Histogram("refine_reward_latency_seconds",
                                        "Seconds a reward takes to score one batch (the scoring alone: not "
                                        "request parsing, publishing or acknowledging)",
                                        buckets=LATENCY_BUCKETS, registry=r("reward_latency"))
        self.scored_batches = Counter("refine_scored_batches", "Rollout batches scored", registry=r("scored_batches"))
        # Learner
        self.learner_steps = Counter("refine_learner_steps", "Learner steps taken by this process (batches: "
                                     "train.mini_batches optimizer steps each)", registry=r("learner_steps"))
        self.learner_step = Gauge("refine_learner_step", "The run's learner step (a resumed run continues it)",
                                  registry=r("learner_step"))
        self.policy_loss = Gauge("refine_policy_loss", "Clipped policy-gradient loss", registry=r("policy_loss"))
        self.ntp_loss = Gauge("refine_ntp_loss", "Next-token cross-entropy", registry=r("ntp_loss"))
        self.eval_ntp_loss = Gauge("refine_eval_ntp_loss", "Next-token cross-entropy on data.eval_source's held-out "
                                   "documents, at the last step that measured it (0 before)",
                                   registry=r("eval_ntp_loss"))
        self.clip_fraction = Gauge("refine_clip_fraction", "Fraction of clipped rollout tokens",
                                   registry=r("clip_fraction"))
        self.approx_kl = Gauge("refine_approx_kl", "Approximate KL(behaviour || current)", registry=r("approx_kl"))
        self.grad_norm = Gauge("refine_grad_norm", "Gradient norm before clipping", registry=r("grad_norm"))
        self.learning_rate = Gauge("refine_learning_rate", "Learning rate of the last step (optim.schedule)",
                                   registry=r("learning_rate"))
        self.data_epoch = Gauge("refine_data_epoch", "Passes over data.source the data stream had completed "
                                "when it read the last step's batch", registry=r("data_epoch"))
        self.step_seconds = Histogram("refine_step_seconds", "Time per phase of a step", ["phase"],
                                      buckets=STEP_BUCKETS, registry=r("step_seconds"))
        self.skipped_steps = Counter("refine_skipped_steps", "Steps of the run (a resumed run's included) that left "
                                     "out their update, or a mini-batch's, for a non-finite loss or gradient",
                                     registry=r("skipped_steps"))
        # Weights and staleness
        self.weight_version = Gauge("refine_weight_version", "Policy version this process holds",
                                    registry=r("weight_version"))
        self.staleness = Histogram("refine_rollout_staleness", "Learner version minus rollout version",
                                   buckets=(0, 1, 2, 3, 4, 8, 16), registry=r("staleness"))
        self.stale_dropped = Counter("refine_stale_rollouts_dropped", "Rollout batches of the run (a resumed run's "
                                     "included) dropped as too stale", registry=r("stale_dropped"))
        # Transport and data
        self.stream_length = Gauge("refine_stream_length", "Entries in a Redis stream", ["stream"],
                                   registry=r("stream_length"))
        self.stream_pending = Gauge("refine_stream_pending", "Delivered but unacknowledged entries",
                                    ["stream", "group"], registry=r("stream_pending"))
        self.documents = Counter("refine_documents", "Documents published by the orchestrator",
                                 registry=r("documents"))


@dataclass
class MetricsEndpoint:
    host: str
    port: int
    discovery_file: Path | None
    server: Any = None

    def close(self) -> None:
        """Withdraw the discovery file and stop serving (in-process runs leave no thread behind)."""
        if self.discovery_file is not None:
            self.discovery_file.unlink(missing_ok=True)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


# One label of a host name: letters, digits and '-' inside (and '_', which container networks' names use).
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a host name Prometheus can put in a target; None when it is one."""
    bracketed = host.startswith("[") and host.endswith("]")  # an IPv6 address as a target writes it
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        address = None
    if address is not None and not (bracketed and address.version == 4):
        if address.is_unspecified:
            return "that is the address a server binds to listen on every interface; no scraper reaches it there"
        return None
    name, colon, port = host.rpartition(":")
    if colon and port.isascii() and port.isdigit() and name and _host_problem(name) is None:
        return (f"it holds a port (:{port}); give the host alone: every process serves on a port of its own, "
                f"which it announces")
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return "not an IP address or a host name (letters, digits, '-' and '.')"
    if labels[-1].isdigit():  # dotted numbers are meant as an IPv4 address, and this is none
        return "not an IPv4 address (four numbers in 0..255, such as 10.0.0.5)"
    return None


def metrics_host() -> str:
    """The host of this process' metrics targets, as Prometheus writes it ([...] around an IPv6 address):
    REFINE_METRICS_HOST, the address Prometheus reaches this node at, else loopback (an empty value, as a failed
    `hostname -i` in a launcher leaves it, counts as unset). A ValueError naming the variable and its value when
    it is no IP address or host name: Prometheus would only show the target down, or drop the whole file."""
    raw = os.environ.get("REFINE_METRICS_HOST", "")
    host = raw.strip() or "127.0.0.1"
    problem = _host_problem(host)
    if problem is not None:
        raise ValueError(f"REFINE_METRICS_HOST={raw!r} (the address Prometheus reaches this node's metrics at): "
                         f"{problem}")
    return f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address in a target


def bind_address(host: str) -> str:
    """The address to serve the metrics of announced target host `host` (as `metrics_host` gives it) at. A
    loopback host (127.0.0.1 when REFINE_METRICS_HOST is unset; ::1, any 127.x.y.z, "localhost") is served at
    that loopback address alone: a Prometheus on this node scrapes it at the announced target, and no other
    machine or container reaches it. Any other host (the multi-node case: the node's address on the
    network Prometheus scrapes from) is served on every interface of its family: "::" for an IPv6 address (an
    IPv4-only server refuses an IPv6 target), else "0.0.0.0" (a host name is not resolved: the address
    Prometheus finds for it may be none this node binds, such as a NAT's)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(bare)
    except ValueError:
        address = None
    if address is None:
        name = bare.lower().removesuffix(".")
        return "127.0.0.1" if name == "localhost" or name.endswith(".localhost") else "0.0.0.0"
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    if (mapped or address).is_loopback:  # ::ffff:127.0.0.1 is IPv4's loopback
        return str(mapped or address)
    return "::" if address.version == 6 else "0.0.0.0"


def _file_stem(*parts: str) -> str:
    return file_name_part("-".join(parts))


def _file_name(member: str, host: str, port: int) -> str:
    # "~" appears in no stem, so a member's prefix never matches another run whose name extends its own.
    return f"{member}~{_file_stem(f'{host}_{port}')}.json"


def prepare_discovery_dir(discovery_dir: str | Path) -> Path:
    """The metrics discovery directory, created (with its parents) if missing; a ValueError naming
    service.metrics_discovery_dir and the OS's reason when it cannot be (a file there, no permission, a
    read-only or virtual file system such as /proc). The service calls it before it starts Ray, and every
    role before it announces itself."""
    directory = Path(discovery_dir)
    problem = discovery_dir_problem(directory)
    if problem is None:
        try:
            missing = [folder for folder in (directory, *directory.parents) if not folder.exists()]
            directory.mkdir(parents=True, exist_ok=True)
            if directory == Path(BUILT_IN_DISCOVERY_DIR):
                # Every user's runs on a node announce in this one folder: made as /tmp is (sticky, so that each
                # removes only files of its own), not as the first user's alone, which refused everyone else's.
                for folder in missing:
                    folder.chmod(0o1777)
        except OSError as error:
            at = f" ({error.filename})" if error.filename and str(error.filename) != str(directory) else ""
            problem = f"cannot create the directory: {error.strerror or error}{at}"
    if problem is None:
        try:  # one that exists may still refuse files (another user's, on a shared node): try one, as roles write
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
                return directory
        except OSError as error:
            problem = f"cannot write files in it: {error.strerror or error}"
    raise ValueError(f"{discovery_dir_setting(directory)}: {problem}")


def serve_metrics(metrics: Metrics, role: str, instance: str, discovery_dir: str | Path | None,
                  bind: str | None = None, run: str = "") -> MetricsEndpoint:
    """Serve `metrics` on a free port and announce it in `discovery_dir` (the run's
    service.metrics_discovery_dir; None: no announcement) for Prometheus file service discovery; `run` (the
    service's namespace) lets the run withdraw the announcement of a member it killed. `bind`: by default
    `bind_address` of the announced host: that loopback address alone when the host is loopback (without
    REFINE_METRICS_HOST, 127.0.0.1), every interface of its family only for a host other machines reach."""
    # Before the server starts: a directory that cannot be created, or a host that is none, leaves no server
    # thread behind.
    directory = None if discovery_dir is None else prepare_discovery_dir(discovery_dir)
    host = metrics_host()
    if bind is None:
        bind = bind_address(host)
    server, _ = start_http_server(0, addr=bind, registry=metrics.registry)
    port = server.server_port
    discovery_file = None
    if directory is not None:
        # One file per served target: a same-named member of another run on this node keeps its own.
        discovery_file = directory / _file_name(_file_stem(role, instance, *([run] if run else [])), host, port)
        labels = {"role": role, "instance_id": instance, "node": socket.gethostname()} | ({"run": run} if run else {})
        payload = [{"targets": [f"{host}:{port}"], "labels": labels}]
        write_atomically(discovery_file, json.dumps(payload))  # Prometheus never reads half a file
    return MetricsEndpoint(host, port, discovery_file, server)


def withdraw_run_announcements(discovery_dir: str | Path, run: str) -> int:
    """Remove every discovery file of run `run` (its `run` label); returns how many there were. Called as a run
    starts, before any member of it serves: a driver killed with SIGKILL left its members' files behind, and
    each would stay a target that is down for good."""
    removed = 0
    for path in Path(discovery_dir).glob("*.json"):
        try:
            labels = json.loads(path.read_text())[0]["labels"]
        except (OSError, ValueError, LookupError, TypeError):  # not a file of ours, or gone meanwhile
            continue
        if isinstance(labels, dict) and labels.get("run") == run:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def withdraw_announcements(discovery_dir: str | Path, role: str, instance: str, run: str) -> int:
    """Remove the discovery files of member `instance` of run `run` (killed before it could remove its own,
    it would stay a down target); returns how many there were."""
    removed = 0
    for path in Path(discovery_dir).glob(f"{_file_stem(role, instance, run)}~*.json"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
