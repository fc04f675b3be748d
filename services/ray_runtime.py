"""Where the run's Ray and Redis come from.

Ray: an already initialized Ray (a notebook, a test session) is used as it is; otherwise an
address (the `--ray-address` flag, `service.ray_address`, or RAY_ADDRESS, which `ray job submit`
sets for its entrypoint) is connected to; otherwise a local Ray is started in-process, without the
dashboard, on ports Ray picks (never Redis' 6379), with enough logical CPUs for the run's actors.
With train.device cuda every learner rank holds one GPU (`actor_options`), so the cluster needs
service.num_learners of them, and every actor's request must fit one node (`check_placement`).

Placement: each actor is created in a placement group of one bundle holding its resources (`Placement`). Ray
tells through its public API whether a group is placed, where it says nothing of a single actor's (its state API
needs the dashboard): the orchestrator can so tell an actor waiting for room on a node from one that started.

Redis: a URL (`--redis-url`, `service.redis_url`, or REFINE_REDIS_URL), else an embedded
redis-server for the lifetime of the run.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.util import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from refine.config import RunConfig
from services.redis_server import EmbeddedRedis, connect

__all__ = ["Placement", "RayPlan", "actor_cpus", "actor_options", "check_placement", "check_ray_address",
           "free_per_node", "gpus_needed", "ray_for_run", "redis_for_run", "resolve_addresses", "resource_request"]

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # weights travel through Redis; the store holds small results
RAY_ADDRESS_SOURCES = "--ray-address, service.ray_address or RAY_ADDRESS"
# Ray accounts resources in units of 1e-4; a request equal to a node's total fits it.
RESOURCE_EPSILON = 1e-6


@dataclass(frozen=True)
class RayPlan:
    address: str | None
    redis_url: str | None


def resolve_addresses(config: RunConfig, ray_address: str | None = None, redis_url: str | None = None) -> RayPlan:
    """Flag, then config, then environment; None means "start one for this run"."""
    address = ray_address or config.service.ray_address or os.environ.get("RAY_ADDRESS") or None
    url = redis_url or config.service.redis_url or os.environ.get("REFINE_REDIS_URL") or None
    return RayPlan(address=address, redis_url=url)


def actor_cpus(config: RunConfig) -> dict[str, float]:
    """Logical CPUs each role asks Ray for. Roles mostly wait on each other, so small shares are
    enough; rollout workers take `service.worker_cpus`."""
    service = config.service
    if service.mode == "colocated":
        return {"learner": 1.0}
    return {
        "learner": 1.0,
        "rollout_worker": service.worker_cpus,
        "reward": 0.25,
    }


def actor_options(config: RunConfig, role: str) -> dict[str, float]:
    """The resources `role`'s actor asks Ray for: its CPUs (`actor_cpus`) and, for a learner rank training on
    CUDA, one GPU of its own: Ray then shows the actor only that GPU (CUDA_VISIBLE_DEVICES), where every rank
    would otherwise take cuda:0, and NCCL refuses two ranks on one device."""
    options = {"num_cpus": actor_cpus(config)[role]}
    if role == "learner" and config.train.device.startswith("cuda"):
        options["num_gpus"] = 1.0
    return options


def gpus_needed(config: RunConfig) -> float:
    return actor_options(config, "learner").get("num_gpus", 0.0) * config.service.num_learners


def cpus_needed(config: RunConfig) -> float:
    cpus = actor_cpus(config)
    total = cpus["learner"] * config.service.num_learners  # every data-parallel rank is an actor
    if config.service.mode != "colocated":
        total += cpus["rollout_worker"] * config.service.num_rollout_workers
        total += cpus["reward"] * config.service.num_reward_replicas
    return total


# A gRPC server (Ray's GCS, the Ray Client server) answers an HTTP/2 client preface with a SETTINGS frame.
HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS
HTTP2_FRAME_HEADER_BYTES = 9
HTTP2_SETTINGS = 4


def check_ray_address(address: str, timeout_s: float = 2.0) -> None:
    """Fail fast, naming the address, when nothing at a `host:port` (or `ray://host:port`) Ray address
    answers as Ray does: ray.init would retry an unreachable one for minutes, and wait without end on
    a listener that is not Ray (another server, a proxy), printing only GCS timeouts. Ray's endpoints
    speak gRPC, so the probe sends an HTTP/2 preface and expects the server's SETTINGS frame back.
    Other forms ("auto", "local", ...) are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal, [::1]:6379
    if not sep or not host or not (port.isascii() and port.isdigit()):
        return
    if not 0 < int(port) < 65536:
        raise ValueError(f"Ray address {address!r} ({RAY_ADDRESS_SOURCES}): port {port} is not in 1..65535")
    where = f"Ray at {address!r} ({RAY_ADDRESS_SOURCES})"
    # The same pattern as the Redis URL check (services.redis_server.connect): one short TCP connect.
    try:
        connection = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as exc:
        raise ValueError(f"{where} is unreachable within {timeout_s}s: {type(exc).__name__}: {exc}") from None
    with connection:
        header = b""
        try:
            connection.sendall(HTTP2_CLIENT_PREFACE)
            while len(header) < HTTP2_FRAME_HEADER_BYTES:
                chunk = connection.recv(HTTP2_FRAME_HEADER_BYTES - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError:  # a timeout or a reset: what was read so far decides
            pass
    if len(header) < HTTP2_FRAME_HEADER_BYTES or header[3] != HTTP2_SETTINGS:
        answer = f"it answered {header[:16]!r}" if header else f"no answer within {timeout_s}s"
        raise ValueError(f"{where}: something listens there but does not answer as a Ray cluster (gRPC): {answer}")


@contextmanager
def ray_for_run(config: RunConfig, address: str | None) -> Iterator[bool]:
    """Ray for the run; yields whether Ray runs on more than one node. Shuts down (or disconnects
    from) only a Ray this function started."""
    needed = cpus_needed(config)
    started = False
    if not ray.is_initialized():
        if address and address != "local":
            check_ray_address(address)
            try:
                ray.init(address=address, log_to_driver=True)
            except ConnectionError as exc:  # something listens there, but no Ray cluster answered
                raise ValueError(f"Ray at {address!r} ({RAY_ADDRESS_SOURCES}): {exc}") from None
        else:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                log_to_driver=True,
            )
        started = True
    try:
        available = float(ray.cluster_resources().get("CPU", 0.0))
        if available < needed:
            raise ValueError(
                f"the Ray cluster has {available:g} CPUs but this run's actors need {needed:g} "
                f"(service.num_rollout_workers={config.service.num_rollout_workers} x "
                f"service.worker_cpus={config.service.worker_cpus:g}, learner 1, reward replicas 0.25 each)"
            )
        check_gpus(config, float(ray.cluster_resources().get("GPU", 0.0)))
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        check_placement(config, nodes)
        yield len(nodes) > 1
    finally:
        if started:
            ray.shutdown()


def check_gpus(config: RunConfig, available: float) -> None:
    """Fail before starting anything when the cluster has fewer GPUs than the learner ranks need (their
    actors would wait for them until the start timeout)."""
    needed = gpus_needed(config)
    if available < needed:
        raise ValueError(
            f"the Ray cluster has {available:g} GPUs but train.device={config.train.device!r} gives each of the "
            f"service.num_learners={config.service.num_learners} learner ranks one: {needed:g} needed"
        )


def resource_request(options: dict[str, float]) -> dict[str, float]:
    """An actor's options (`actor_options`) in Ray's resource names, as a node lists them."""
    request = {"CPU": options["num_cpus"]}
    if options.get("num_gpus"):
        request["GPU"] = options["num_gpus"]
    return request


def describe_resources(resources: dict[str, float], kinds: Iterable[str], of: dict[str, float] | None = None) -> str:
    """"1.5 CPUs, 1 GPU" (or with `of`, "0.5 of 2 CPUs, 0 of 1 GPU"): the amounts of `resources` of `kinds`."""
    parts = []
    for kind in kinds:
        amount, total = resources.get(kind, 0.0), None if of is None else of.get(kind, 0.0)
        unit = kind if (amount if total is None else total) == 1 else f"{kind}s"
        parts.append(f"{amount:g} {unit}" if total is None else f"{amount:g} of {total:g} {unit}")
    return ", ".join(parts)


def fits(request: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(kind, 0.0) + RESOURCE_EPSILON >= amount for kind, amount in request.items())


def asked_by(config: RunConfig, role: str) -> str:
    """What `role`'s actor asks Ray for, naming the setting behind it."""
    request = resource_request(actor_options(config, role))
    if role == "rollout_worker":
        return f"a rollout worker: service.worker_cpus={config.service.worker_cpus} asks for that many CPUs"
    if role == "learner" and "GPU" in request:
        return (f"a learner rank: {describe_resources(request, request)} (train.device={config.train.device!r} "
                f"gives each rank a GPU)")
    return f"a {'learner rank' if role == 'learner' else 'reward replica'}: {describe_resources(request, request)}"


def check_placement(config: RunConfig, nodes: list[dict[str, Any]]) -> None:
    """Fail before starting anything when an actor asks for more than any alive node has in all (`nodes` shaped as
    ray.nodes() gives them). Ray places an actor's resources on one node: a request no node can hold is infeasible,
    and its actor would wait without end, though the cluster's totals suffice."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    for role in actor_cpus(config):
        request = resource_request(actor_options(config, role))
        if any(fits(request, resources) for resources in alive):
            continue
        kinds = sorted(request, key=lambda kind: kind != "GPU")  # a GPU request ranks nodes by GPUs first
        largest = max(alive, key=lambda resources: [resources.get(kind, 0.0) for kind in kinds], default={})
        raise ValueError(f"no node of the Ray cluster can hold {asked_by(config, role)}; Ray places an actor on one "
                         f"node, and the largest has {describe_resources(largest, request)}")


def free_per_node(nodes: list[dict[str, Any]], groups: dict[str, dict[str, Any]],
                  available: dict[str, float]) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """(address, free, total) of every alive node: its total (ray.nodes()) less the placement group bundles Ray
    placed on it (placement_group_table()), and never more than the whole cluster has free
    (ray.available_resources()). Ray's public API gives no node's free resources; every actor of a run sits in a
    placement group, so only work started outside them (another job's tasks) goes uncounted per node."""
    reserved: dict[str, dict[str, float]] = {}
    for group in groups.values():
        if group.get("state") != "CREATED":
            continue
        for index, bundle in group.get("bundles", {}).items():
            held = reserved.setdefault(group.get("bundles_to_node_id", {}).get(index, ""), {})
            for kind, amount in bundle.items():
                held[kind] = held.get(kind, 0.0) + amount
    result = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        total = node.get("Resources", {})
        held = reserved.get(node.get("NodeID", ""), {})
        free = {kind: max(0.0, min(total.get(kind, 0.0) - held.get(kind, 0.0), available.get(kind, 0.0)))
                for kind in ("CPU", "GPU")}
        result.append((str(node.get("NodeManagerAddress", node.get("NodeID", "?"))), free, total))
    return result


class Placement:
    """One actor's resources reserved on one node: a placement group of one bundle, created at once. The actor is
    created in it (`strategy`); the group outlives the actor, so a replacement takes the same reserved room."""

    def __init__(self, name: str, options: dict[str, float]) -> None:
        self.request = resource_request(options)
        self.group = placement_group([self.request])
        self.renew(name)

    def renew(self, name: str) -> None:
        """A new actor, `name`, goes into the group: whether it is placed is asked afresh (a group whose node died
        waits for Ray to place it again)."""
        self.name = name
        self.asked_at = time.monotonic()
        self.placed_at: float | None = None
        self.reported = False

    def strategy(self) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=0)

    def placed(self) -> bool:
        """Whether Ray holds the resources on a node (asked once placed: the answer is kept)."""
        if self.placed_at is None and placement_group_table(self.group).get("state") == "CREATED":
            self.placed_at = time.monotonic()
        return self.placed_at is not None

    def since_placed(self) -> float:
        """Seconds since this actor was found placed; 0 until then."""
        return 0.0 if self.placed_at is None else time.monotonic() - self.placed_at

    def waiting_note(self, grace_s: float) -> str | None:
        """One line saying what the actor waits for and what each node has free, the first time it is found
        unplaced `grace_s` after it asked; None otherwise."""
        waited = time.monotonic() - self.asked_at
        if self.placed() or self.reported or waited < grace_s:
            return None
        self.reported = True
        nodes = free_per_node(ray.nodes(), placement_group_table(), ray.available_resources())
        rooms = "; ".join(f"{address} {describe_resources(free, self.request, of=total)}"
                          for address, free, total in nodes)
        return (f"{self.name} is waiting for Ray to place it ({waited:.0f}s so far): it asks for "
                f"{describe_resources(self.request, self.request)} on one node; free now: {rooms or 'no alive node'}. "
                f"It starts once a node has room")

    def release(self) -> None:
        """Give the resources back (an actor still in the group is killed)."""
        remove_placement_group(self.group)


@contextmanager
def redis_for_run(url: str | None, multi_node: bool) -> Iterator[str]:
    """The run's Redis URL: checked with PING when given, else an embedded server started here."""
    if url:
        connect(url).close()  # fails fast, naming the URL, when it is unreachable
        yield url
        return
    if multi_node:
        raise ValueError(
            "the Ray cluster has several nodes: give a Redis every node can reach "
            "(--redis-url, service.redis_url or REFINE_REDIS_URL); the embedded one listens on 127.0.0.1 only"
        )
    with EmbeddedRedis() as server:
        yield server.url
