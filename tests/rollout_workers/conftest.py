"""Fixtures for the rollout worker tests: a Redis client and namespace of their own per test, the
tiny service config."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from refine.config import RunConfig, load_config
from services.broker import Broker
from services.redis_server import connect

SERVICE_TINY = Path(__file__).resolve().parents[2] / "configs" / "service_tiny.yaml"


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
def tiny_config(tmp_path: Path) -> Callable[..., RunConfig]:
    """configs/service_tiny.yaml (a 2-layer, 64-wide DeltaNet on CPU) with files under tmp_path and
    extra `section.field=value` overrides."""
    def make(*overrides: str) -> RunConfig:
        return load_config(SERVICE_TINY, [f"train.out_dir={tmp_path / 'run'}",
                                          f"service.metrics_discovery_dir={tmp_path / 'prometheus'}", *overrides])
    return make
