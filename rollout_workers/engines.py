"""Rollout engines: given weights and a document batch, produce REFINE rollouts.

One interface, so a worker does not care which engine serves it. `SnapshotEngine` (the default)
is the one-pass engine of `refine.algorithm.rollout`: one no-grad document pass, states at the
selected positions, all position x sample continuations decoded as one batch. `vllm`
(rollout_workers/vllm_engine.py, an optional extra) serves DeltaNet / Gated DeltaNet through vLLM.

Rollouts are a deterministic function of (weights, documents, seed): each batch gets its own
generator seeded from the run seed and the batch's place in the data stream, so any worker (a
restarted one, or the same batch rolled out again after a resume) samples the same tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from refine.algorithm.rollout import Rollouts, snapshot_rollouts
from refine.config import RunConfig
from refine.loop import prepare_model

__all__ = ["ENGINES", "RolloutEngine", "SnapshotEngine", "build_engine", "check_state_dict",
           "engine_owner"]


def check_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights whose tensor names or shapes differ from `expected`'s, with a ValueError naming the first
    differences."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{name} {tuple(state_dict[name].shape)} != {tuple(expected[name].shape)}"
              for name in sorted(set(state_dict) & set(expected)) if state_dict[name].shape != expected[name].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"weights do not fit the served model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shapes {shapes[:5]}")


class RolloutEngine(Protocol):
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> None: ...

    def rollout(self, input_ids: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> Rollouts: ...

    def close(self) -> None:
        """Release what the engine holds outside this process' memory (vLLM's engine, staged checkpoints)."""


class SnapshotEngine:
    """Snapshot rollouts on our own model classes (any architecture, CPU or GPU)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.device = config.train.device
        # Architecture and dtype as the learner builds them; the weights come from the store.
        self.model = prepare_model(config, training=False).requires_grad_(False).eval()
        self.weight_version: int | None = None

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> None:
        # Checked first: load_state_dict copies every tensor that fits before it raises on one that does not.
        check_state_dict(state_dict, self.model.state_dict())
        self.model.load_state_dict(state_dict, strict=True)
        self.weight_version = version

    def rollout(self, input_ids: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> Rollouts:
        ids = input_ids.to(self.device, dtype=torch.long)
        lens = lengths.to(self.device, dtype=torch.long)
        return snapshot_rollouts(self.model, ids, lens, self.config.refine, generator)

    def close(self) -> None:
        pass  # nothing outside this process' memory


def engine_owner(namespace: str, worker_id: str) -> str:
    """Who an engine belongs to: a worker of one run (what names its vLLM staging folder and seeds vLLM)."""
    return f"{namespace}-{worker_id}"


def _snapshot_engine(config: RunConfig, owner: str | None) -> RolloutEngine:
    return SnapshotEngine(config)  # its randomness is the batch's generator alone; it keeps no files


def _vllm_engine(config: RunConfig, owner: str | None) -> RolloutEngine:
    from rollout_workers.vllm_engine import VllmEngine  # optional extra: imported only when chosen

    return VllmEngine(config, worker_id=owner)


ENGINES = {"snapshot": _snapshot_engine, "vllm": _vllm_engine}


def build_engine(config: RunConfig, name: str | None = None, *, owner: str | None = None) -> RolloutEngine:
    """The engine `name` (default: rollout.engine) for `owner` (see `engine_owner`; None outside a service)."""
    name = name or config.rollout.engine
    if name not in ENGINES:
        raise ValueError(f"rollout engine {name!r} is not available (available: {sorted(ENGINES)})")
    return ENGINES[name](config, owner)
