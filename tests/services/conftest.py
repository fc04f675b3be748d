"""Fixtures for the transport tests (the Redis client, namespace and broker come from tests/conftest.py)."""

import socket
import time
from collections.abc import Callable

import pytest
import redis


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def wait_for_blocked_read() -> Callable[[redis.Redis], None]:
    """Waits until a client of the server (`client`'s) waits in a blocking XREADGROUP."""

    def wait(client: redis.Redis) -> None:
        deadline = time.monotonic() + 30
        while not any(row["cmd"] == "xreadgroup" and "b" in row["flags"] for row in client.client_list()):
            assert time.monotonic() < deadline, "no read blocked within 30s"
            time.sleep(0.01)

    return wait
