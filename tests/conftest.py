"""Fixtures shared by every test folder."""

from collections.abc import Iterator

import pytest

from services.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server started for this test session (never the machine's own server)."""
    with EmbeddedRedis() as server:
        yield server.url
