"""Where the run's Ray and Redis come from.

Ray: an already initialized Ray (a notebook, a test session) is used as it is; otherwise an
address (the `--ray-address` flag, `service.ray_address`, or RAY_ADDRESS, which `ray job submit`
sets for its entrypoint) is connected to: HOST:PORT of the head's GCS, `auto`, or ray://HOST:PORT
(Ray Client; any other scheme is refused, `check_ray_address`); otherwise (or with `local`) a local
Ray is started in-process, without the dashboard, on ports Ray picks (never Redis' 6379), with enough
logical CPUs for the run's actors.
With train.device cuda every learner rank holds one GPU (`actor_options`), so the cluster needs
service.num_learners of them, and every actor's request must fit one node (`check_placement`).

Placement: every actor's resources are reserved at once, before any actor is created, in one placement group of
the run (`Reservation`): one bundle per actor (`actor_requests`), strategy PACK. Ray places a group all or nothing,
so it finds the run's actors a joint fit on the cluster's nodes where one actor's group at a time could take the
room another needs and leave it waiting for good. Each actor is created in its own bundle (`Placement`), and a
replacement takes its predecessor's. Ray tells through its public API whether a group is placed, where it says
nothing of a single actor's (its state API needs the dashboard): the orchestrator can so tell a run waiting for room
from one that started. `check_placement` refuses at start a run whose actors no packing fits into the nodes' totals.

Redis: a URL (`--redis-url`, `service.redis_url`, or REFINE_REDIS_URL), else an embedded
redis-server for the lifetime of the run.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.util import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from refine.config import RunConfig
from refine.runtime import command_exit_now, end_without_finalizing, sigterm_received
from services.metrics import metrics_host, prepare_discovery_dir
from services.redis_server import URL_SOURCES, EmbeddedRedis, connect, redact_url
from services.source_digest import PROJECT_PACKAGES

__all__ = ["ActorRequest", "Placement", "RayCluster", "RayPlan", "Reservation", "actor_cpus", "actor_options", "actor_requests",
           "check_no_hidden_packages", "check_placement", "check_ray_address", "fit_together", "free_per_node",
           "gpus_needed", "ray_for_run", "redis_for_run", "resolve_addresses", "resource_request"]

logger = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # weights travel through Redis; the store holds small results
LOCAL_RAY_KILL_WAIT_S = 10.0  # for the kernel to end a local Ray's killed processes
# After a SIGTERM: how long a driver whose local Ray lost its control store or raylet may take to end (its own stop
# takes 3-10 s), and how often that is looked at.
SIGNALLED_RAY_DEADLINE_S = 15.0
SIGNALLED_RAY_POLL_S = 0.5
RAY_ADDRESS_SOURCES = "--ray-address, service.ray_address or RAY_ADDRESS"
# Ray accounts resources in units of 1e-4; a request equal to a node's total fits it.
RESOURCE_EPSILON = 1e-6
_INSTALLED_AT = Path(__file__).resolve().parents[1]


class RayAddress(str):
    """A Ray address that knows which setting gave it (`source`: --ray-address, service.ray_address or
    RAY_ADDRESS), so that an error about it names that one. A plain str everywhere else."""

    source: str

    def __new__(cls, address: str, source: str) -> "RayAddress":
        value = super().__new__(cls, address)
        value.source = source
        return value


def address_source(address: str) -> str:
    """The setting `address` came from, or all three when it is a plain str (not from `resolve_addresses`)."""
    return getattr(address, "source", RAY_ADDRESS_SOURCES)


@dataclass(frozen=True)
class RayPlan:
    address: str | None
    redis_url: str | None


def resolve_addresses(config: RunConfig, ray_address: str | None = None, redis_url: str | None = None) -> RayPlan:
    """Flag, then config, then environment; None means "start one for this run"."""
    address = None
    for value, source in ((ray_address, "--ray-address"), (config.service.ray_address, "service.ray_address"),
                          (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")):
        if value:
            address = RayAddress(value, source)
            break
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
# A GCS call any client may make first (ray.init's own first call): answered UNAUTHENTICATED without a valid token.
GCS_CLUSTER_ID_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


# What --ray-address takes, for the messages that refuse something else.
RAY_ADDRESS_FORMS = ("HOST:PORT of the head's GCS (`ray start --head --port`, 6379 unless set; deploy/ uses 6380), "
                     "`auto` on a node of the cluster (inside `ray job submit`), or ray://HOST:10001 for Ray Client")


def check_ray_address(address: str, timeout_s: float = 2.0) -> None:
    """Fail fast, naming the address, when nothing at a `host:port` (or `ray://host:port`) Ray address
    answers as Ray does: ray.init would retry an unreachable one for minutes, and wait without end on
    a listener that is not Ray (another server, a proxy), printing only GCS timeouts. Ray's endpoints
    speak gRPC, so the probe sends an HTTP/2 preface and expects the server's SETTINGS frame back.
    An http(s):// address is the dashboard's (what `ray job submit --address` takes), refused with what to
    give instead; so is any other scheme but ray:// (Ray Client's, the only one a run supports). Other
    forms ("auto", "local", ...) are left to Ray."""
    source = address_source(address)
    scheme, sep, rest = str(address).partition("://")
    if sep and scheme.lower() in ("http", "https"):
        raise ValueError(f"Ray address {str(address)!r} ({source}) is an HTTP address: that is the dashboard's, "
                         f"where `ray job submit --address` sends jobs; a run connects to the cluster itself: give "
                         f"{RAY_ADDRESS_FORMS}")
    if sep and scheme != "ray":
        # Ray takes SCHEME:// for a Ray Client protocol of a Python module SCHEME (a traceback for grpc://, which has
        # none), and the probe read grpc://host as a host name: only Ray's own, ray://, is one a run supports.
        shown = str(address)
        if scheme in ("redis", "rediss"):
            shown = redact_url(shown)  # its password stays out of the message
            why = f"that is a Redis URL's, which the run takes from {URL_SOURCES}"
        elif scheme.lower() == "ray":
            why = "Ray reads the scheme as written, and Ray Client's is ray://, in lower case"
        else:
            why = "the only scheme a run connects with is ray://, Ray Client's"
        raise ValueError(f"Ray address {shown!r} ({source}): {scheme}:// is not a Ray address scheme: {why}; "
                         f"give {RAY_ADDRESS_FORMS}")
    ray_client = bool(sep)  # ray://: Ray Client's server, which has no GCS methods
    host, sep, port = (rest if sep else str(address)).rpartition(":")
    host = host.strip("[]")  # an IPv6 literal, [::1]:6379
    if sep and not host:  # ":6379": Ray fails on it with a traceback
        raise ValueError(f"Ray address {str(address)!r} ({source}) names no host; give {RAY_ADDRESS_FORMS}")
    if not sep or not (port.isascii() and port.isdigit()):
        return
    if not 0 < int(port) < 65536:
        raise ValueError(f"Ray address {str(address)!r} ({source}): port {port} is not in 1..65535")
    where = f"Ray at {str(address)!r} ({source})"
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
    if not ray_client:
        _check_token_auth(host, int(port), where, timeout_s)


def _check_token_auth(host: str, port: int, where: str, timeout_s: float) -> None:
    """Refuse a cluster that requires Ray's token authentication when this process is not set up for it: ray.init
    would print "Authentication token is missing or incorrect" once a second for about 20 s and then fail with
    "Failed to connect", naming no setting. One unauthenticated GCS call tells."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return  # ray.init sends the token; a wrong one is Ray's to report
    import grpc  # Ray's own transport: installed with it

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(GCS_CLUSTER_ID_METHOD, request_serializer=None, response_deserializer=None)
        try:
            call(b"", timeout=timeout_s)  # an empty request message
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ValueError(
                    f"{where} requires Ray's token authentication ({error.details()}): set RAY_AUTH_MODE=token, with "
                    f"the cluster's token in RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH names, or in "
                    f"~/.ray/auth_token") from None
            # Anything else (an older Ray without that method, a slow head) is ray.init's to report.


@dataclass(frozen=True)
class RayCluster:
    """The Ray a run uses."""

    multi_node: bool  # more than one node: the actors reach Redis over the network
    client: bool  # connected through Ray Client (ray://): the driver runs off the cluster, its actors on it
    started_here: bool  # a local Ray of the run's own: its shutdown takes the run's actors and placement group
    # What must still be done if the driver is abandoned (`_SignalledRayDeadline`): never a call to Ray.
    last_resort: list[Callable[[], None]] = field(default_factory=list)


@contextmanager
def ray_for_run(config: RunConfig, address: str | None) -> Iterator[RayCluster]:
    """Ray for the run. Shuts down (or disconnects from) only a Ray this function started."""
    needed = cpus_needed(config)
    started = False
    connects = not ray.is_initialized() and bool(address) and address != "local"
    if connects:
        check_ray_address(address)
    # Where the roles announce their metrics ports: a file there, or no permission, fails before Ray starts; so does
    # a REFINE_METRICS_HOST that is no host (a local Ray's actors inherit it, and the orchestrator reads it).
    prepare_discovery_dir(config.service.metrics_discovery_dir)
    metrics_host()
    keep_sigterm = _sigterm_keeper()
    try:
        if not ray.is_initialized():
            with _signals_held_back():  # a stop that came meanwhile is raised here, with the Ray started stopped below
                _start_ray(address, connects, needed)
                started = True
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
        cluster = RayCluster(multi_node=len(nodes) > 1, client=ray.util.client.ray.is_connected(), started_here=started)
        with _SignalledRayDeadline(cluster) if started else nullcontext():
            yield cluster
    finally:
        if started:
            _shutdown_local_ray()
        keep_sigterm()


def _start_ray(address: str | None, connects: bool, cpus: float) -> None:
    """ray.init: connected to `address` when `connects`, else a local Ray of the run's own with `cpus` CPUs or more."""
    if not connects:
        ray.init(
            # "local": a Ray of this run's own, even where another user's `ray start --head` left its
            # address in /tmp/ray (ray.init() would join that cluster, which refuses num_cpus).
            address="local",
            num_cpus=max(os.cpu_count() or 1, int(cpus + 0.999)),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=True,
        )
        return
    try:
        ray.init(address=str(address), log_to_driver=True)
    except ConnectionError as exc:  # something listens there, but no Ray cluster answered
        raise ValueError(f"Ray at {str(address)!r} ({address_source(address)}): {exc}") from None
    except ValueError as exc:  # Ray's own refusal of the form: "Invalid address format: garbage"
        reason = " ".join(str(exc).split())
        hint = f"; give {RAY_ADDRESS_FORMS}" if "address" in reason.lower() else ""
        raise ValueError(f"Ray address {str(address)!r} ({address_source(address)}): {reason}{hint}") from None


@contextmanager
def _signals_held_back() -> Iterator[None]:
    """While ray.init runs: Ctrl-C noted and raised once it returned; SIGTERM ends the process at once, with the
    processes of the Ray being started.

    ray.init puts in its own SIGTERM handler, which exits with 15 at once (no line, some of the Ray's processes
    left), and whose SystemExit, raised inside the logging module's at-fork hook while Ray starts its processes, is
    dropped: the signal was lost and the run trained on to its end. A KeyboardInterrupt there is dropped the same
    way, hence Ctrl-C is held back. A SIGTERM is not: sent to the whole process group (`timeout`, systemd, Slurm)
    it also ends the Ray's first processes, and ray.init then waits 60 s for them before Ray's core ends the process.
    Nothing of the run began yet (no actor, no Redis key). A no-op off the main thread; a signal this process
    ignores, or whose handler was set outside Python, keeps it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    held = [signum for signum, handler in kept.items() if handler not in (None, signal.SIG_IGN)]
    older = {process.pid for process in psutil.Process().children(recursive=True)}
    ctrl_c = threading.Event()

    def end_ray_start(signum: int, frame: object) -> None:  # in a thread: the main one may hold stderr's lock
        threading.Thread(target=_end_ray_start, args=(older, kept[signal.SIGTERM]), daemon=True).start()

    handlers = {signal.SIGTERM: end_ray_start, signal.SIGINT: lambda signum, frame: ctrl_c.set()}
    for signum in held:
        signal.signal(signum, handlers[signum])
    set_sigterm_handler = ray._private.utils.set_sigterm_handler
    ray._private.utils.set_sigterm_handler = lambda handler: None  # ray.init's, which would replace ours
    try:
        yield
    finally:
        ray._private.utils.set_sigterm_handler = set_sigterm_handler
        for signum in held:
            signal.signal(signum, kept[signum])
        if ctrl_c.is_set():
            kept[signal.SIGINT](signal.SIGINT, None)


def _end_ray_start(older: set[int], handler: Any) -> None:
    """Kill the processes this one started since `older` (those of the Ray being started), then end as SIGTERM ends
    it: by the signal where it has no handler, else as a stopped command (exit 130)."""
    _kill_processes([process for process in psutil.Process().children(recursive=True) if process.pid not in older])
    if handler is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    try:
        print("refine: interrupted while Ray started: the run had not begun", file=sys.stderr)
    except (OSError, ValueError):  # no stderr left: the exit code says it
        pass
    command_exit_now(130)


def _shutdown_local_ray() -> None:
    """ray.shutdown() for the Ray this run started, unless a SIGTERM stopped the run or the Ray's control store is
    gone. A signal to the whole process group (`timeout`, systemd, Slurm) reaches the local Ray's processes too,
    unlike Ctrl-C, which they block (its agents end, and its raylet with them): shutting the driver down then waits
    for them, seconds or 60 s, after which Ray's core ends the process (the run had stopped cleanly). Every process
    of that Ray is killed instead (`_kill_local_ray`), and the command ends without the interpreter's finalization,
    where Ray's client, never shut down, would crash (refine.runtime.command_exit)."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and (sigterm_received() or _exited(node, ray._private.ray_constants.PROCESS_TYPE_GCS_SERVER)):
        _kill_local_ray(node)
        atexit.unregister(ray._private.worker.shutdown)
        end_without_finalizing()
        return
    ray.shutdown()


def _exited(node: Any, *kinds: str) -> bool:
    """Whether a process of one of `kinds` (Ray's process types: gcs_server, raylet) that local Ray `node` started
    has exited."""
    return any(info.process.poll() is not None for kind in kinds for info in node.all_processes.get(kind, []))


def _kill_local_ray(node: Any) -> None:
    """SIGKILL every process of the local Ray `node` started, and their descendants: its workers (each in a process
    group of its own, so a signal to the driver's misses them) and agents, which outlive a raylet killed alone."""
    processes = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                processes += [*root.children(recursive=True), root]  # before the parent dies: then they are init's
            except psutil.NoSuchProcess:
                continue
    _kill_processes(processes)
    node.kill_all_processes(check_alive=False, allow_graceful=False)  # reaps the ones this process started


def _kill_processes(processes: list[psutil.Process]) -> None:
    """SIGKILL `processes` and wait for them to end (reaping those that are this process's children)."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=LOCAL_RAY_KILL_WAIT_S)


class _SignalledRayDeadline:
    """Ends the process if, after a SIGTERM, the run's local Ray lost its control store or raylet and the driver has
    not ended within SIGNALLED_RAY_DEADLINE_S: a call to Ray then waits for them, or for Ray's core to end the process
    60 s later (exit 1), and a KeyboardInterrupt raised meanwhile may never reach the run's code (measured: a group
    SIGTERM while the learner starts, under load). The run's last-resort work is done (its Redis keys deleted, its
    Prometheus targets withdrawn), the Ray killed, and the process ends as a stopped command does (exit 130)."""

    def __init__(self, cluster: RayCluster) -> None:
        self.cluster = cluster
        self.node = ray._private.worker._global_node
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="refine-signalled-ray-deadline", daemon=True)

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.done.set()  # the run's own end goes on from here (_shutdown_local_ray)
        self.thread.join()

    def _watch(self) -> None:
        gone_at = None
        while not self.done.wait(SIGNALLED_RAY_POLL_S):
            if gone_at is None:
                if sigterm_received() and _exited(self.node, ray._private.ray_constants.PROCESS_TYPE_GCS_SERVER,
                                                  ray._private.ray_constants.PROCESS_TYPE_RAYLET):
                    gone_at = time.monotonic()
            elif time.monotonic() - gone_at > SIGNALLED_RAY_DEADLINE_S:
                self._abandon()

    def _abandon(self) -> None:
        for work in self.cluster.last_resort:
            try:
                work()
            except Exception as exc:  # the rest still runs, and the process still ends
                logger.warning("%s", exc)
        _kill_local_ray(self.node)
        try:
            print(f"refine: interrupted: the run's local Ray ended with the signal, and the driver did not within "
                  f"{SIGNALLED_RAY_DEADLINE_S:.0f}s; a --resume goes on from the run's last checkpoint", file=sys.stderr)
        except (OSError, ValueError):  # no stderr left: the exit code says it
            pass
        command_exit_now(130)


def check_no_hidden_packages(directory: Path | None = None) -> None:
    """Refuse a module in the run's working directory (default: the current one) named as one of the project's
    packages, a user's own `reward.py` say: Ray's workers put that directory first on their import path (`ray job
    submit --working-dir` uploads it and starts there), so the actors would import it in the package's place and
    fail to start, far from the cause. A checkout of the project passes: its folders are the packages, or a copy of
    them (every module of the imported package is there too, as in a checkout beside a `pip install .`)."""
    directory = Path.cwd() if directory is None else Path(directory)
    for name in PROJECT_PACKAGES:
        ours = _INSTALLED_AT / name  # the packages are installed side by side
        module, package = directory / f"{name}.py", directory / name / "__init__.py"
        if module.is_file():
            found = module
        elif package.is_file() and not _holds_modules_of(package.parent, ours):
            found = package
        else:
            continue  # a folder without __init__.py is no package: imports look past it
        raise ValueError(f"{found} would hide the project's {name!r} package ({ours}) from the run's "
                         f"Ray actors, which import from the working directory {directory} first: rename it, or "
                         f"start the run from another directory")


def _holds_modules_of(folder: Path, package: Path) -> bool:
    return {path.name for path in package.glob("*.py")} <= {path.name for path in folder.glob("*.py")}


def _sigterm_keeper() -> Callable[[], None]:
    """What puts back this process's SIGTERM handler as it is now: ray.init replaces it (Python's with sys.exit,
    then its C++ core's own, which dumps a stack), and a driver must go on stopping on SIGTERM as on Ctrl-C (the
    CLI's handler) before and after its service run, not die at once. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    handler = signal.getsignal(signal.SIGTERM)
    if handler is None:  # set outside Python: nothing Python can put back
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, handler)


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


@dataclass(frozen=True)
class ActorRequest:
    """One actor's bundle of the run's placement group: its name ("learner", "learner rank 1", "rollout_worker-0",
    "reward-0": a member's id less its incarnation), its role (a key of `actor_cpus`) and its resources, which Ray
    holds on one node."""

    name: str
    role: str
    resources: dict[str, float]


def actor_requests(config: RunConfig) -> list[ActorRequest]:
    """Every actor of the run, in the order of their bundles: learner rank 0, ranks 1..R-1, then (disaggregated) each
    rollout worker and each reward replica."""
    service = config.service
    learner = resource_request(actor_options(config, "learner"))
    requests = [ActorRequest("learner" if rank == 0 else f"learner rank {rank}", "learner", learner)
                for rank in range(service.num_learners)]
    if service.mode != "colocated":
        for role, count in (("rollout_worker", service.num_rollout_workers), ("reward", service.num_reward_replicas)):
            request = resource_request(actor_options(config, role))
            requests += [ActorRequest(f"{role}-{index}", role, request) for index in range(count)]
    return requests


def describe_requests(requests: list[ActorRequest]) -> str:
    """"learner (1 CPU), rollout_worker-0..3 (1.5 CPUs each), reward-0 (0.25 CPUs)": every actor's request, a role's
    (all alike) together."""
    parts = []
    for role in dict.fromkeys(request.role for request in requests):
        group = [request for request in requests if request.role == role]
        amount = describe_resources(group[0].resources, group[0].resources)
        if len(group) == 1:
            parts.append(f"{group[0].name} ({amount})")
        elif len(group) == 2:
            parts.append(f"{group[0].name} and {group[1].name} ({amount} each)")
        else:
            names = f"learner ranks 0..{len(group) - 1}" if role == "learner" else f"{role}-0..{len(group) - 1}"
            parts.append(f"{names} ({amount} each)")
    return ", ".join(parts)


def describe_settings(config: RunConfig) -> str:
    """The run's actors with the settings that ask for them."""
    service = config.service

    def amount(role: str) -> str:
        request = resource_request(actor_options(config, role))
        return describe_resources(request, request)

    parts = [f"learner ranks: service.num_learners={service.num_learners} of {amount('learner')} each "
             f"(train.device={config.train.device!r})"]
    if service.mode != "colocated":
        parts.append(f"rollout workers: service.num_rollout_workers={service.num_rollout_workers} of "
                     f"service.worker_cpus={service.worker_cpus:g} CPUs each")
        parts.append(f"reward replicas: service.num_reward_replicas={service.num_reward_replicas} of "
                     f"{amount('reward')} each")
    return ", ".join(parts)


def alive_nodes(nodes: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """Every alive node (shaped as ray.nodes() gives them) with how messages name it: its address, and a short node id
    beside it where alive nodes share an address (several Ray nodes started on one machine)."""
    alive = [node for node in nodes if node.get("Alive")]
    addresses = [str(node.get("NodeManagerAddress") or node.get("NodeID", "?")) for node in alive]
    return [(node, f"{address} (node {str(node.get('NodeID', '?'))[:8]})" if addresses.count(address) > 1 else address)
            for node, address in zip(alive, addresses)]


def request_kinds(requests: Iterable[dict[str, float]]) -> list[str]:
    """The resource kinds `requests` ask for, GPUs first (the scarce kind ranks requests and nodes)."""
    return sorted({kind for request in requests for kind in request}, key=lambda kind: (kind != "GPU", kind))


def first_fit_decreasing(requests: list[dict[str, float]], capacities: list[dict[str, float]]) -> bool:
    """Whether first-fit decreasing packs `requests` (largest first, GPUs before CPUs) onto the nodes' `capacities`,
    each request on one node. A heuristic: True proves a packing exists, False does not prove none does."""
    kinds = request_kinds(requests)
    rooms = [dict(capacity) for capacity in capacities]
    for request in sorted(requests, key=lambda request: [request.get(kind, 0.0) for kind in kinds], reverse=True):
        room = next((room for room in rooms if fits(request, room)), None)
        if room is None:
            return False
        for kind, amount in request.items():
            room[kind] = room.get(kind, 0.0) - amount
    return True


# How many node assignments the exhaustive packing search (`fit_together`) tries before it gives up undecided.
PACKING_SEARCH_STEPS = 200_000


class _Undecided(Exception):
    pass


def fit_together(requests: list[dict[str, float]], capacities: list[dict[str, float]],
                 steps: int | None = None) -> bool | None:
    """Whether `requests`, each on one node, fit the nodes' `capacities` all together. True when first-fit decreasing
    packs them; otherwise a search of every assignment decides (alike requests counted together, node by node):
    False when none fits, None when it gave up undecided after `steps` (PACKING_SEARCH_STEPS) assignments."""
    if first_fit_decreasing(requests, capacities):
        return True
    kinds = request_kinds(requests)
    types: list[tuple[float, ...]] = []
    counts: list[int] = []
    for request in requests:
        key = tuple(request.get(kind, 0.0) for kind in kinds)
        if key in types:
            counts[types.index(key)] += 1
        else:
            types.append(key)
            counts.append(1)
    rooms = sorted((tuple(capacity.get(kind, 0.0) for kind in kinds) for capacity in capacities), reverse=True)
    # What the nodes from each one on hold in all: a remainder over it cannot fit them.
    beyond = [tuple(sum(room[i] for room in rooms[start:]) for i in range(len(kinds)))
              for start in range(len(rooms) + 1)]
    budget = [PACKING_SEARCH_STEPS if steps is None else steps]
    hopeless: set[tuple[int, tuple[int, ...]]] = set()

    def takes(room: tuple[float, ...], left: tuple[int, ...], first: int = 0) -> Iterator[tuple[int, ...]]:
        """How many of each type (from `first` on) one node of `room` can take, the most first."""
        if first == len(types):
            yield ()
            return
        for count in range(left[first], -1, -1):
            rest = tuple(room[i] - count * types[first][i] for i in range(len(kinds)))
            if all(value >= -RESOURCE_EPSILON for value in rest):
                for more in takes(rest, left, first + 1):
                    yield (count, *more)

    def search(node: int, left: tuple[int, ...]) -> bool:
        if not any(left):
            return True
        needed = [sum(count * kind_amounts[i] for count, kind_amounts in zip(left, types)) for i in range(len(kinds))]
        if (node, left) in hopeless or any(amount > held + RESOURCE_EPSILON
                                           for amount, held in zip(needed, beyond[node])):
            return False
        for take in takes(rooms[node], left):
            budget[0] -= 1
            if budget[0] < 0:
                raise _Undecided
            if search(node + 1, tuple(count - taken for count, taken in zip(left, take))):
                return True
        hopeless.add((node, left))
        return False

    try:
        return search(0, tuple(counts))
    except _Undecided:
        return None


def check_placement(config: RunConfig, nodes: list[dict[str, Any]]) -> None:
    """Fail before starting anything when the run's actors cannot be placed on the alive nodes (`nodes` shaped as
    ray.nodes() gives them), each actor's resources on one node: Ray would wait for room without end, though the
    cluster's totals suffice. First an actor that asks for more than any node has in all; then the actors together,
    which Ray places all or nothing (one placement group, `Reservation`), on the nodes' totals: refused when no packing
    fits them, a warning when the search for one gave up undecided (Ray may still find one)."""
    alive = alive_nodes(nodes)
    for role in actor_cpus(config):
        request = resource_request(actor_options(config, role))
        if any(fits(request, node.get("Resources", {})) for node, _ in alive):
            continue
        kinds = sorted(request, key=lambda kind: kind != "GPU")  # a GPU request ranks nodes by GPUs first
        largest = max((node.get("Resources", {}) for node, _ in alive),
                      key=lambda resources: [resources.get(kind, 0.0) for kind in kinds], default={})
        raise ValueError(f"no node of the Ray cluster can hold {asked_by(config, role)}; Ray places an actor on one "
                         f"node, and the largest has {describe_resources(largest, request)}")
    requests = [request.resources for request in actor_requests(config)]
    fit = fit_together(requests, [node.get("Resources", {}) for node, _ in alive])
    if fit:
        return
    kinds = request_kinds(requests)
    totals = "; ".join(f"{label} {describe_resources(node.get('Resources', {}), kinds)}" for node, label in alive)
    if fit is False:
        raise ValueError(
            f"the Ray cluster's nodes cannot hold this run's actors together: {describe_settings(config)}; each "
            f"actor's resources go on one node, and no assignment of them fits the nodes' totals ({totals}): "
            f"first-fit decreasing found none, and neither did a search of every assignment. Ray places them all or "
            f"nothing, so the run would wait for room without end: lower service.worker_cpus or "
            f"service.num_rollout_workers, or add a node")
    logger.warning(
        "first-fit decreasing found no way to fit this run's actors together on the Ray cluster's nodes "
        "(%s; nodes' totals: %s), and a search of every assignment gave up undecided after %d tries: Ray may still "
        "place them; if it cannot, the run says so and waits for room", describe_settings(config), totals,
        PACKING_SEARCH_STEPS)


def free_per_node(nodes: list[dict[str, Any]], groups: dict[str, dict[str, Any]],
                  available: dict[str, float]) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """(label, free, total) of every alive node (label: `alive_nodes`): its total (ray.nodes()) less the placement
    group bundles Ray placed on it (placement_group_table()), and never more than the whole cluster has free
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
    for node, label in alive_nodes(nodes):
        total = node.get("Resources", {})
        held = reserved.get(node.get("NodeID", ""), {})
        free = {kind: max(0.0, min(total.get(kind, 0.0) - held.get(kind, 0.0), available.get(kind, 0.0)))
                for kind in ("CPU", "GPU")}
        result.append((label, free, total))
    return result


# A placed group is asked again after this long (Ray places a node's bundles anew when the node dies).
PLACED_RECHECK_S = 1.0


class Reservation:
    """The resources of every actor of a run, reserved at once before any actor is created: one placement group with
    a bundle per actor (`actor_requests`), strategy PACK. Ray places a group all or nothing, so it either finds every
    actor its room (a joint fit: a 1.5-CPU worker on the node with 2 CPUs, the learner on the one with 1) or none;
    actors placed one at a time could take the room another needs and leave it waiting for good. Each actor takes
    its own bundle (`placement`), a replacement its predecessor's; `release` gives all back at the run's end."""

    def __init__(self, requests: list[ActorRequest]) -> None:
        self.requests = list(requests)
        self.group = placement_group([dict(request.resources) for request in self.requests], strategy="PACK")
        self.asked_at = time.monotonic()
        self.reported = False
        self._placed = False
        self._checked_at = float("-inf")

    def placement(self, name: str) -> "Placement":
        """The bundle of the actor `name` (an ActorRequest's name)."""
        for index, request in enumerate(self.requests):
            if request.name == name:
                return Placement(self, index)
        raise KeyError(f"no bundle of the run's placement group is for {name!r}: "
                       f"{[request.name for request in self.requests]}")

    def placed(self) -> bool:
        """Whether Ray holds every bundle on a node. A group that loses bundles (their node died) waits for Ray to
        place them again: it is then said to wait again, after the grace."""
        now = time.monotonic()
        if self._placed and now - self._checked_at < PLACED_RECHECK_S:
            return True
        placed = placement_group_table(self.group).get("state") == "CREATED"
        self._checked_at = now
        if self._placed and not placed:
            self.asked_at, self.reported = now, False
        self._placed = placed
        return placed

    def waiting_note(self, grace_s: float) -> str | None:
        """One line saying that the run's actors wait to be placed together, what each asks for and what each node
        has free, the first time the group is found unplaced `grace_s` after it was asked for; None otherwise."""
        if self.reported or time.monotonic() - self.asked_at < grace_s or self.placed():
            return None
        self.reported = True
        waited = time.monotonic() - self.asked_at
        kinds = request_kinds(request.resources for request in self.requests)
        nodes = free_per_node(ray.nodes(), placement_group_table(), ray.available_resources())
        rooms = "; ".join(f"{label} {describe_resources(free, kinds, of=total)}" for label, free, total in nodes)
        return (f"the run's actors cannot all be placed together on the Ray cluster's nodes right now ({waited:.0f}s "
                f"so far): Ray reserves them in one placement group, all or nothing, each actor's resources on one "
                f"node: {describe_requests(self.requests)}; free now: {rooms or 'no alive node'}. The run starts once "
                f"they fit (a node joins or frees up)")

    def release(self) -> None:
        """Give every actor's resources back (actors still in the group are killed)."""
        remove_placement_group(self.group)


class Placement:
    """One actor's bundle of the run's `Reservation`. The actor is created in it (`strategy`); the group outlives the
    actor, so a replacement takes the same reserved room."""

    def __init__(self, reservation: Reservation, index: int) -> None:
        self.reservation = reservation
        self.index = index
        self.request = reservation.requests[index].resources
        self.renew(reservation.requests[index].name)

    def renew(self, name: str) -> None:
        """A new actor, `name`, goes into the bundle: whether it is placed is asked afresh (a group whose node died
        waits for Ray to place it again)."""
        self.name = name
        self.placed_at: float | None = None

    def strategy(self) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.reservation.group,
                                                placement_group_bundle_index=self.index)

    def placed(self) -> bool:
        """Whether Ray holds the bundle on a node (the whole group; asked once placed: the answer is kept)."""
        if self.placed_at is None and self.reservation.placed():
            self.placed_at = time.monotonic()
        return self.placed_at is not None

    def since_placed(self) -> float:
        """Seconds since this actor was found placed; 0 until then."""
        return 0.0 if self.placed_at is None else time.monotonic() - self.placed_at


@contextmanager
def redis_for_run(url: str | None, cluster: RayCluster) -> Iterator[str]:
    """The run's Redis URL: checked with PING when given, else an embedded server started here, where the actors can
    reach it (one node, and the driver on it)."""
    if url:
        connect(url).close()  # fails fast, naming the URL, when it is unreachable
        yield url
        return
    if cluster.multi_node or cluster.client:
        where = ("the Ray cluster has several nodes" if cluster.multi_node else
                 "the run connects through Ray Client (ray://), so its actors run on the cluster, off this machine")
        raise ValueError(
            f"{where}: give a Redis every node can reach (--redis-url, service.redis_url or REFINE_REDIS_URL); the "
            f"embedded one listens on this machine's 127.0.0.1 only"
        )
    with EmbeddedRedis() as server:
        yield server.url
