"""Fixtures for the service tests: one small local Ray per test session (real Redis comes from the
session's `redis_url` fixture or from the test itself)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray shared by the tests; the orchestrator uses an initialized Ray as it is."""
    ray.init(num_cpus=4, object_store_memory=100 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
