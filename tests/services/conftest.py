"""Fixtures for the transport tests: a client and a namespace of its own for every test."""

import socket
import uuid
from collections.abc import Iterator

import pytest
import redis

from services.broker import Broker
from services.redis_server import connect


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    Broker(redis_client, name).delete_namespace()


@pytest.fixture
def broker(redis_client: redis.Redis, namespace: str) -> Broker:
    return Broker(redis_client, namespace)


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
