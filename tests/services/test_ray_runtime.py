"""Where a run's Ray comes from: an unreachable --ray-address fails fast, without starting Ray."""

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import ray

from refine.config import RunConfig
from services.ray_runtime import actor_options, check_gpus, check_ray_address, ray_for_run


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
