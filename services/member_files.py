"""What a killed member of a service run leaves behind, which the run removes for it."""

from __future__ import annotations

from refine.config import RunConfig
from refine_vllm.settings import remove_staging
from rollout_workers.engines import engine_owner
from services.metrics import withdraw_announcements

__all__ = ["remove_member_files", "remove_staged_checkpoints"]


def remove_member_files(config: RunConfig, namespace: str, role: str, member_id: str) -> None:
    """What a killed member of run `namespace` could not remove itself: its metrics discovery files and, for a
    rollout worker on the vLLM engine, its staged checkpoints in rollout.vllm.weights_dir (where this host
    sees them)."""
    withdraw_announcements(config.service.metrics_discovery_dir, role, member_id, namespace)
    remove_staged_checkpoints(config, namespace, role, member_id)


def remove_staged_checkpoints(config: RunConfig, namespace: str, role: str, member_id: str) -> None:
    """A rollout worker's staged checkpoints on the vLLM engine (see remove_member_files); nothing for others."""
    from rollout_workers.worker import ROLE as WORKER_ROLE

    rollout = config.rollout
    if role == WORKER_ROLE and rollout.engine == "vllm" and rollout.vllm.weights_dir is not None:
        remove_staging(rollout.vllm.weights_dir, engine_owner(namespace, member_id))
