"""Fixtures for the rollout worker tests: the tiny service config (the Redis client, namespace and broker
come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from refine.config import RunConfig, load_config

SERVICE_TINY = Path(__file__).resolve().parents[2] / "configs" / "service_tiny.yaml"


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., RunConfig]:
    """configs/service_tiny.yaml (a 2-layer, 64-wide DeltaNet on CPU) with files under tmp_path and
    extra `section.field=value` overrides."""
    def make(*overrides: str) -> RunConfig:
        return load_config(SERVICE_TINY, [f"train.out_dir={tmp_path / 'run'}",
                                          f"service.metrics_discovery_dir={tmp_path / 'prometheus'}", *overrides])
    return make
