"""Fixtures shared by every test folder."""

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import torch

from services.broker import Broker
from services.redis_server import EmbeddedRedis, connect


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server started for this test session (never the machine's own server)."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A namespace of this test's own, deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    Broker(redis_client, name).delete_namespace()


@pytest.fixture
def broker(redis_client: redis.Redis, namespace: str) -> Broker:
    return Broker(redis_client, namespace)


@pytest.fixture
def host_reads() -> Callable[[Callable[[], Any]], tuple[int, Any]]:
    """Runs a call and counts the tensor values it reads back on the host (.item(), bool(tensor),
    int(tensor)): each one waits for a GPU's queued work. Returns (reads, the call's result)."""
    def count(call: Callable[[], Any]) -> tuple[int, Any]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = call()
        return sum(event.name == "aten::_local_scalar_dense" for event in prof.events()), result
    return count
