"""Where the run's Ray and Redis come from.

Ray: an already initialized Ray (a notebook, a test session) is used as it is; otherwise an
address (the `--ray-address` flag, `service.ray_address`, or RAY_ADDRESS, which `ray job submit`
sets for its entrypoint) is connected to; otherwise a local Ray is started in-process, without the
dashboard, on ports Ray picks (never Redis' 6379), with enough logical CPUs for the run's actors.
With train.device cuda every learner rank holds one GPU (`actor_options`), so the cluster needs
service.num_learners of them.

Redis: a URL (`--redis-url`, `service.redis_url`, or REFINE_REDIS_URL), else an embedded
redis-server for the lifetime of the run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from refine.config import RunConfig
from services.redis_server import EmbeddedRedis, connect

__all__ = ["RayPlan", "actor_cpus", "actor_options", "check_ray_address", "gpus_needed", "ray_for_run", "redis_for_run",
           "resolve_addresses"]

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # weights travel through Redis; the store holds small results
RAY_ADDRESS_SOURCES = "--ray-address, service.ray_address or RAY_ADDRESS"


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
