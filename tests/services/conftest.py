"""Fixtures for the transport tests (the Redis client, namespace and broker come from tests/conftest.py)."""

import socket

import pytest


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
