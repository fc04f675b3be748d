"""Where a run's Ray comes from: an unreachable --ray-address fails fast, without starting Ray."""

import socket
import time

import pytest
import ray

from refine.config import RunConfig
from services.ray_runtime import check_ray_address, ray_for_run


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


def test_a_listening_address_and_forms_without_a_port_are_left_to_ray() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        check_ray_address(f"127.0.0.1:{sock.getsockname()[1]}")
    for address in ("auto", "local", "ray://head", "head"):
        check_ray_address(address)  # no port to probe: Ray resolves these itself


def test_a_ray_that_does_not_answer_is_one_line_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something listens (a proxy, another server) but no Ray cluster answers: ray.init's
    ConnectionError, after its own retries, becomes the one-line error."""
    def no_cluster(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1234")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(ValueError) as info:
            with ray_for_run(RunConfig(), address):
                pass
    assert str(info.value).startswith(f"Ray at {address!r} (--ray-address, service.ray_address or RAY_ADDRESS): ")
    assert "Failed to connect" in str(info.value)
