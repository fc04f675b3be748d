"""Where a run's Ray comes from: an unreachable --ray-address fails fast, without starting Ray."""

import http.server
import os
import re
import shutil
import subprocess
import sys
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from packaging.version import Version

from refine.config import RunConfig
from services.ray_runtime import (
    PROJECT_PACKAGES, RayAddress, RayCluster, actor_options, address_source, check_gpus, check_no_hidden_packages, check_ray_address,
    ray_for_run, redis_for_run, resolve_addresses,
)
from services.redis_server import connect

CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray looks uninitialized, and starting it is a test failure."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "[::1]:{port}"])
def test_an_unreachable_ray_address_fails_fast_naming_the_flag_and_the_value(
    closed_port: int, no_ray: None, form: str
) -> None:
    address = form.format(port=closed_port)
    started = time.monotonic()
    with pytest.raises(ValueError) as info:
        with ray_for_run(RunConfig(), address):
            pass
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert message.startswith(
        f"Ray at {address!r} (--ray-address, service.ray_address or RAY_ADDRESS) is unreachable within 2.0s: ")
    assert "\n" not in message


def test_an_out_of_range_port_is_refused(no_ray: None) -> None:
    with pytest.raises(ValueError, match=r"Ray address '127.0.0.1:99999' \(--ray-address.*port 99999 is not in 1..65535"):
        check_ray_address("127.0.0.1:99999")


def test_forms_without_a_port_are_left_to_ray() -> None:
    for address in ("auto", "local", "ray://head", "head"):
        check_ray_address(address)  # no port to probe: Ray resolves these itself


class _Http1Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def http1_address() -> Iterator[str]:
    """A real HTTP/1 server: something listens and answers, but not as Ray."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Http1Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_address() -> Iterator[str]:
    """A listener that accepts connections (the kernel completes them) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("listener,answer", [("silent_address", "no answer within 2.0s"),
                                             ("http1_address", "it answered b'<!DOCTYPE")])
def test_a_listener_that_is_not_ray_fails_fast_naming_the_flag_and_what_answered(
    listener: str, answer: str, no_ray: None, request: pytest.FixtureRequest
) -> None:
    # ray.init would wait on such an address without end (over 5 minutes, printing only GCS timeouts).
    address = request.getfixturevalue(listener)
    started = time.monotonic()
    with pytest.raises(ValueError) as info:
        with ray_for_run(RunConfig(), address):
            pass
    assert time.monotonic() - started < 5
    prefix = (f"Ray at {address!r} (--ray-address, service.ray_address or RAY_ADDRESS): something listens there "
              f"but does not answer as a Ray cluster (gRPC): ")
    message = str(info.value)
    assert message.startswith(prefix + answer) and "\n" not in message


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_every_learner_rank_on_cuda_asks_ray_for_a_gpu_of_its_own(mode: str) -> None:
    config = RunConfig()
    config.service.mode = mode
    config.train.device = "cuda"
    assert actor_options(config, "learner") == {"num_cpus": 1.0, "num_gpus": 1.0}
    config.train.device = "cpu"
    assert actor_options(config, "learner") == {"num_cpus": 1.0}
    if mode == "disaggregated":  # the other roles' devices are not the learner's train.device
        config.train.device = "cuda:0"
        assert "num_gpus" not in actor_options(config, "rollout_worker")
        assert "num_gpus" not in actor_options(config, "reward")


def test_a_cluster_with_fewer_gpus_than_cuda_learner_ranks_is_refused_naming_the_fields() -> None:
    config = RunConfig()
    config.train.device = "cuda"
    config.service.num_learners = 2
    check_gpus(config, 2.0)
    with pytest.raises(ValueError, match=r"the Ray cluster has 1 GPUs but train.device='cuda' gives each of the "
                                         r"service.num_learners=2 learner ranks one: 2 needed"):
        check_gpus(config, 1.0)
    config.train.device = "cpu"
    check_gpus(config, 0.0)


@pytest.fixture
def rays_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray looks uninitialized; ray.init reads its address as Ray does (the ValueError of a malformed one), and
    connecting to a well-formed one is a test failure."""
    from ray._private.services import canonicalize_bootstrap_address

    def parse_only(address: str | None = None, **kwargs: object) -> None:
        canonicalize_bootstrap_address(address)
        raise AssertionError(f"ray.init would connect to {address!r}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", parse_only)


# Before 2.49 Ray's address parsing (all that the rays_parser fixture runs of ray.init) let "garbage" through, and
# ray.init refused it only while connecting ("Port is not specified for address garbage", the same ValueError path).
@pytest.mark.skipif(Version(ray.__version__) < Version("2.49"),
                    reason=f"Ray {ray.__version__} reads no malformed address before connecting; 2.49 does")
@pytest.mark.parametrize("source", ["--ray-address", "service.ray_address", "RAY_ADDRESS"])
def test_a_malformed_ray_address_is_refused_naming_the_setting_it_came_from(
    source: str, rays_parser: None, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Was `refine: error: Invalid address format: garbage`, naming neither the flag nor what it takes."""
    config = RunConfig()
    config.service.metrics_discovery_dir = str(tmp_path / "prometheus")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    flag = None
    if source == "--ray-address":
        flag = "garbage"
    elif source == "service.ray_address":
        config.service.ray_address = "garbage"
    else:
        monkeypatch.setenv("RAY_ADDRESS", "garbage")
    plan = resolve_addresses(config, flag)
    with pytest.raises(ValueError) as info:
        with ray_for_run(config, plan.address):
            pass
    message = str(info.value)
    assert message.startswith(f"Ray address 'garbage' ({source}): Invalid address format: garbage; give HOST:PORT "
                              f"of the head's GCS"), message
    assert "\n" not in message


@pytest.mark.parametrize("address", [":6380", "ray://:10001", "[]:6380"])
def test_an_address_without_a_host_is_refused_naming_it(address: str, no_ray: None) -> None:
    """Ray failed on ":6380" with a traceback and "Malformed host:", without the forms the flag takes."""
    with pytest.raises(ValueError, match=rf"^Ray address '{re.escape(address)}' \(--ray-address\) names no host; "
                                         r"give HOST:PORT of the head's GCS"):
        check_ray_address(RayAddress(address, "--ray-address"))


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "https://head.example:8265/", "HTTP://head:8265"])
def test_the_dashboard_address_is_refused_saying_what_the_flag_takes(address: str, no_ray: None) -> None:
    """README's `ray job submit --address http://HEAD:8265` is the dashboard's: given to --ray-address it was probed
    as a host named `http://127.0.0.1` (gaierror after the probe's timeout)."""
    started = time.monotonic()
    with pytest.raises(ValueError) as info:
        with ray_for_run(RunConfig(), resolve_addresses(RunConfig(), address).address):
            pass
    assert time.monotonic() - started < 1
    message = str(info.value)
    assert message.startswith(f"Ray address {address!r} (--ray-address) is an HTTP address: that is the dashboard's, "
                              f"where `ray job submit --address` sends jobs")
    assert "HOST:PORT of the head's GCS" in message and "ray://HOST:10001" in message and "gaierror" not in message


def test_an_address_of_an_unknown_client_protocol_is_refused(no_ray: None) -> None:
    # Ray reads foo://... as a Ray Client protocol of a module foo: a RuntimeError traceback when there is none.
    with pytest.raises(ValueError, match=r"Ray address 'nosuchmodule://head:1' \(--ray-address, service.ray_address "
                                         r"or RAY_ADDRESS\): nosuchmodule:// is not a Ray address scheme: the only "
                                         r"scheme a run connects with is ray://"):
        check_ray_address("nosuchmodule://head:1")


@pytest.mark.parametrize("source", ["--ray-address", "service.ray_address", "RAY_ADDRESS"])
@pytest.mark.parametrize("address,why", [
    ("grpc://{host}", "grpc:// is not a Ray address scheme: the only scheme a run connects with is ray://, Ray "
                      "Client's"),
    ("os://{host}", "os:// is not a Ray address scheme: the only scheme a run connects with is ray://, Ray Client's"),
    ("RAY://{host}", "RAY:// is not a Ray address scheme: Ray reads the scheme as written, and Ray Client's is "
                     "ray://, in lower case"),
    ("redis://{host}/0", "redis:// is not a Ray address scheme: that is a Redis URL's, which the run takes from "
                         "--redis-url, service.redis_url or REFINE_REDIS_URL"),
], ids=["grpc", "module-without-client", "upper-case-ray", "redis-url"])
def test_a_scheme_other_than_ray_client_is_refused_naming_the_setting_and_what_works(
    address: str, why: str, source: str, silent_address: str, no_ray: None, monkeypatch: pytest.MonkeyPatch,
    tmp_path
) -> None:
    """grpc://HOST:PORT (its module exists, so it passed the check) was probed as a host named 'grpc://HOST':
    'unreachable ... gaierror', though something listens there; Ray itself fails on it with a traceback ('Module:
    grpc does not have ClientBuilder')."""
    address = address.format(host=silent_address)
    config = RunConfig()
    config.service.metrics_discovery_dir = str(tmp_path / "prometheus")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    flag = None
    if source == "--ray-address":
        flag = address
    elif source == "service.ray_address":
        config.service.ray_address = address
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    probed: list[tuple] = []

    def probe(address, *args, **kwargs):
        probed.append(address)
        raise ConnectionRefusedError(f"probed {address}")

    monkeypatch.setattr("services.ray_runtime.socket.create_connection", probe)
    with pytest.raises(ValueError) as info:
        with ray_for_run(config, resolve_addresses(config, flag).address):
            pass
    assert probed == []  # refused as written: nothing probed
    message = str(info.value)
    assert message.startswith(f"Ray address {address!r} ({source}): {why}; give HOST:PORT of the head's GCS"), message
    assert "ray://HOST:10001 for Ray Client" in message and "unreachable" not in message and "\n" not in message


def test_a_redis_url_given_as_the_ray_address_keeps_its_password_out_of_the_message(no_ray: None) -> None:
    with pytest.raises(ValueError) as info:
        check_ray_address("redis://:hunter2@head:6379/0")
    assert "hunter2" not in str(info.value) and "redis:// is not a Ray address scheme" in str(info.value)


def test_the_embedded_redis_of_a_run_answers_only_to_its_url() -> None:
    """The URL every role of the run gets carries the embedded server's password; without it the server refuses."""
    with redis_for_run(None, RayCluster(multi_node=False, client=False, started_here=True)) as url:
        assert connect(url).ping()
        parts = urllib.parse.urlsplit(url)
        assert parts.password
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=parts.hostname, port=parts.port, retry=Retry(NoBackoff(), 0)).ping()  # no retries


@pytest.mark.parametrize("multi_node, client, where", [
    (True, False, "the Ray cluster has several nodes"),
    (False, True, r"the run connects through Ray Client \(ray://\), so its actors run on the cluster, off this machine"),
])
def test_no_redis_is_embedded_where_the_actors_could_not_reach_it(multi_node: bool, client: bool, where: str) -> None:
    """A Ray Client driver runs off the cluster, on one node or several: an embedded Redis on its 127.0.0.1 was
    started for actors that cannot reach it."""
    with pytest.raises(ValueError, match=rf"^{where}: give a Redis every node can reach \(--redis-url, "
                                         r"service.redis_url or REFINE_REDIS_URL\)"):
        with redis_for_run(None, RayCluster(multi_node=multi_node, client=client, started_here=False)):
            pass


def test_a_metrics_host_that_is_no_host_fails_before_ray_starts(
    no_ray: None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = RunConfig()
    config.service.metrics_discovery_dir = str(tmp_path / "prometheus")
    monkeypatch.setenv("REFINE_METRICS_HOST", "10.0.0.5:9100")
    with pytest.raises(ValueError, match=r"^REFINE_METRICS_HOST='10.0.0.5:9100' \(the address Prometheus reaches this "
                                         r"node's metrics at\): it holds a port \(:9100\)"):
        with ray_for_run(config, None):
            pass
    monkeypatch.setenv("REFINE_METRICS_HOST", "10.0.0.5")
    with pytest.raises(AssertionError, match="ray.init was called"):
        with ray_for_run(config, None):
            pass


def test_the_setting_an_address_came_from_follows_the_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "env:1")
    config = RunConfig()
    assert address_source(resolve_addresses(config).address) == "RAY_ADDRESS"
    config.service.ray_address = "config:1"
    plan = resolve_addresses(config)
    assert (plan.address, address_source(plan.address)) == ("config:1", "service.ray_address")
    plan = resolve_addresses(config, "flag:1")
    assert (plan.address, address_source(plan.address)) == ("flag:1", "--ray-address")
    assert address_source("plain:1") == "--ray-address, service.ray_address or RAY_ADDRESS"


def test_an_unusable_metrics_discovery_dir_fails_before_ray_starts(
    no_ray: None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file where the discovery directory should be failed after Ray started, with `[Errno 17] File exists`
    naming no setting. The directory the run uses may come from REFINE_METRICS_DISCOVERY_DIR, applied after the
    config was validated (services.orchestrator._absolute_paths): it is checked, and created, before Ray."""
    blocker = tmp_path / "taken"
    blocker.write_text("")
    config = RunConfig()
    config.service.metrics_discovery_dir = str(blocker)  # assigned as the deployment's directory is
    with pytest.raises(ValueError, match=rf"^service.metrics_discovery_dir='{blocker}': it is a file, not a "
                                         rf"directory"):
        with ray_for_run(config, None):
            pass
    monkeypatch.setenv("REFINE_METRICS_DISCOVERY_DIR", str(blocker / "sub"))
    config.service.metrics_discovery_dir = str(blocker / "sub")
    with pytest.raises(ValueError, match=rf"^service.metrics_discovery_dir='{blocker}/sub' \(from "
                                         rf"REFINE_METRICS_DISCOVERY_DIR\): {blocker} is a file, not a directory"):
        with ray_for_run(config, None):
            pass
    config.service.metrics_discovery_dir = str(tmp_path / "new" / "prometheus")
    with pytest.raises(AssertionError, match="ray.init was called"):  # a usable one: created, then Ray starts
        with ray_for_run(config, None):
            pass
    assert (tmp_path / "new" / "prometheus").is_dir()


def test_a_run_keeps_the_drivers_sigterm_handler_through_ray_start_and_shutdown(tmp_path) -> None:
    """ray.init replaces the SIGTERM handler (sys.exit, then its C++ core's, which dumps a stack): a driver that
    stops on SIGTERM as on Ctrl-C (refine's CLI) died at once in the start-up window and after a service stage."""
    script = (
        "import signal, sys\n"
        "from refine.config import RunConfig\n"
        "from services.ray_runtime import ray_for_run\n"
        "def mine(signum, frame): pass\n"
        "signal.signal(signal.SIGTERM, mine)\n"
        "config = RunConfig()\n"
        "config.service.metrics_discovery_dir = sys.argv[1]\n"
        "with ray_for_run(config, None):\n"
        "    inside = signal.getsignal(signal.SIGTERM) is mine\n"
        "print('handler', inside, signal.getsignal(signal.SIGTERM) is mine)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert "handler True True" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("signalled", ["group", "driver"])
def test_a_sigterm_to_the_drivers_process_group_ends_its_local_ray_wholly(tmp_path: Path, signalled: str) -> None:
    """`timeout`, systemd and Slurm signal the whole process group: the local Ray's processes get the SIGTERM too,
    unlike Ctrl-C, and ray.shutdown() waited for them, seconds or 60 s and an abort (exit 1). Killing them instead
    crashed the interpreter at exit (exit 139) and left the raylet's agents running. `kill PID` signals the driver
    alone: its local Ray is ended the same way."""
    script = (
        "import os, signal, sys, time\n"
        "from refine.config import RunConfig\n"
        "from refine.runtime import command_exit, sigterm_as_ctrl_c\n"
        "from services.ray_runtime import ray_for_run\n"
        "config = RunConfig()\n"
        "config.service.metrics_discovery_dir = sys.argv[1]\n"
        "with sigterm_as_ctrl_c(), ray_for_run(config, None):\n"
        "    try:\n"
        "        print('started', flush=True)\n"
        "        os.killpg(0, signal.SIGTERM) if sys.argv[2] == 'group' else os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "    except KeyboardInterrupt:\n"  # a run's graceful stop takes seconds: Ray's processes react meanwhile
        "        print('stopping', flush=True)\n"
        "        time.sleep(5)\n"
        "sys.exit(command_exit(130))\n"
    )
    code, output, left = _run_driver(script, str(tmp_path), signalled)
    assert (code, left) == (130, []), output[-3000:]
    assert "started" in output and "stopping" in output


@pytest.mark.parametrize("signalled", ["SIGTERM to the group", "SIGTERM to the driver", "SIGINT to the driver"])
def test_a_stop_while_ray_starts_ends_the_driver_and_every_process_of_that_ray(tmp_path: Path, signalled: str) -> None:
    """ray.init put in a SIGTERM handler that exited with 15 at once, leaving some of the Ray's processes, and whose
    exception, raised in the logging module's at-fork hook, was dropped: the run trained on to its end. A group
    SIGTERM also ended the Ray's first processes, and ray.init waited 60 s for them. Here the signal comes once the
    raylet started: SIGTERM ends the driver at once with 130, Ctrl-C once ray.init returned, and no process of that
    Ray is left."""
    script = (
        "import os, signal, sys\n"
        "import ray._private.node\n"
        "from refine.config import RunConfig\n"
        "from refine.runtime import command_exit, sigterm_as_ctrl_c\n"
        "from services.ray_runtime import ray_for_run\n"
        "start_raylet = ray._private.node.Node.start_raylet\n"
        "def start_raylet_then_signal(*args, **kwargs):\n"
        "    start_raylet(*args, **kwargs)\n"
        "    signum = signal.SIGINT if sys.argv[2].startswith('SIGINT') else signal.SIGTERM\n"
        "    os.killpg(0, signum) if sys.argv[2].endswith('group') else os.kill(os.getpid(), signum)\n"
        "ray._private.node.Node.start_raylet = start_raylet_then_signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal: CI may start it ignoring SIGINT
        "config = RunConfig()\n"
        "config.service.metrics_discovery_dir = sys.argv[1]\n"
        "with sigterm_as_ctrl_c():\n"
        "    try:\n"
        "        with ray_for_run(config, None):\n"
        "            print('the run began', flush=True)\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
        "        sys.exit(command_exit(130))\n"
    )
    code, output, left = _run_driver(script, str(tmp_path), signalled)
    assert (code, left) == (130, []), output[-3000:]
    assert "the run began" not in output, output[-3000:]
    if signalled.startswith("SIGTERM"):
        assert "refine: interrupted while Ray started: the run had not begun" in output, output[-3000:]
    else:
        assert "interrupted" in output, output[-3000:]


def test_a_driver_stuck_after_a_sigterm_ended_its_local_ray_is_ended_after_the_last_resort_work(
        tmp_path: Path) -> None:
    """A group SIGTERM while the learner started, under load, ended the local Ray's raylet or control store while the
    driver was inside a call to Ray that never returned (its KeyboardInterrupt lost): the process waited 60 s, Ray's
    core ended it with exit 1, and the run's Redis keys stayed. Here the driver swallows its interrupt and the
    raylet is killed: the deadline does the run's last-resort work, kills the Ray and ends the process with 130."""
    script = (
        "import os, signal, sys, time\n"
        "import ray\n"
        "from refine.config import RunConfig\n"
        "from refine.runtime import sigterm_as_ctrl_c\n"
        "from services.ray_runtime import ray_for_run\n"
        "config = RunConfig()\n"
        "config.service.metrics_discovery_dir = sys.argv[1]\n"
        "with sigterm_as_ctrl_c(), ray_for_run(config, None) as cluster:\n"
        "    cluster.last_resort.append(lambda: print('last resort', flush=True))\n"
        "    node = ray._private.worker._global_node\n"
        "    node.all_processes['raylet'][0].process.kill()\n"
        "    signalled = False\n"
        "    while True:\n"  # a call that never returns, and a KeyboardInterrupt that never reaches the run
        "        try:\n"
        "            if not signalled:\n"
        "                signalled = True\n"
        "                os.kill(os.getpid(), signal.SIGTERM)\n"
        "            time.sleep(1000)\n"
        "        except KeyboardInterrupt:\n"
        "            print('stuck', flush=True)\n"
    )
    code, output, left = _run_driver(script, str(tmp_path))
    assert (code, left) == (130, []), output[-3000:]
    assert output.index("stuck") < output.index("last resort") < output.index("refine: interrupted: the run's local "
                                                                             "Ray ended with the signal"), output


def _run_driver(script: str, *args: str) -> tuple[int, str, list[psutil.Process]]:
    """Run `script` as a driver in a session of its own: its exit code, its output, and the processes left in its
    session once it ended (Ray's own stay there; its workers each get a process group of their own), killed after."""
    driver = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=CHECKOUT, start_new_session=True)
    try:
        output, _ = driver.communicate(timeout=240)
        deadline = time.monotonic() + 15
        while (left := _session_processes(driver.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for process in _session_processes(driver.pid):
            process.kill()
        driver.kill()
        driver.wait()
    return driver.returncode, output, left


def _session_processes(session: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):  # ended meanwhile
            continue
    return found


def test_modules_named_as_the_projects_packages_in_the_working_directory_are_refused(tmp_path: Path) -> None:
    check_no_hidden_packages(CHECKOUT)  # the checkout: its folders are the packages
    check_no_hidden_packages(tmp_path)
    (tmp_path / "reward").mkdir()  # a folder without __init__.py: imports look past it
    check_no_hidden_packages(tmp_path)
    (tmp_path / "reward.py").write_text("")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'reward.py'} would hide the project's 'reward' package "
                                         rf"\({CHECKOUT / 'reward'}\) from the run's Ray actors"):
        check_no_hidden_packages(tmp_path)
    (tmp_path / "reward.py").unlink()
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "__init__.py").write_text("")  # a user's own package of that name
    (tmp_path / "services" / "api.py").write_text("")
    with pytest.raises(ValueError, match=r"services/__init__.py would hide the project's 'services' package"):
        check_no_hidden_packages(tmp_path)


def test_a_copy_of_the_checkout_passes(tmp_path: Path) -> None:
    """A checkout beside a `pip install .`, or uploaded by `ray job submit --working-dir`: the same modules."""
    for name in PROJECT_PACKAGES:
        shutil.copytree(CHECKOUT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    check_no_hidden_packages(tmp_path)
    (tmp_path / "services" / "broker.py").unlink()  # an older copy: the actors would run other code than the driver
    with pytest.raises(ValueError, match="services/__init__.py would hide"):
        check_no_hidden_packages(tmp_path)
