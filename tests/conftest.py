"""Fixtures shared by every test folder."""

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from services.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server started for this test session (never the machine's own server)."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def host_reads() -> Callable[[Callable[[], Any]], tuple[int, Any]]:
    """Runs a call and counts the tensor values it reads back on the host (.item(), bool(tensor),
    int(tensor)): each one waits for a GPU's queued work. Returns (reads, the call's result)."""
    def count(call: Callable[[], Any]) -> tuple[int, Any]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = call()
        return sum(event.name == "aten::_local_scalar_dense" for event in prof.events()), result
    return count
