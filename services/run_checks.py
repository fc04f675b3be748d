"""The checks a service run passes before Ray, Redis and any actor start: a configuration the service can run,
and data sources it can read."""

from __future__ import annotations

import sys

from refine.config import RunConfig, run_tokenizer
from refine.config_parsing import ConfigError
from refine.data.readers import RowSource
from refine.data.stream import synthetic_documents
from refine.evaluation.heldout import heldout_documents

__all__ = ["check_data_source", "check_service_config"]


def check_service_config(config: RunConfig) -> None:
    """Reject combinations the service cannot run, naming the fields."""
    service = config.service
    if config.train.mode in ("ntp", "reference"):
        raise ValueError(
            f"train.mode={config.train.mode!r} runs only in the single-process loop (refine train --local); the "
            f"service trains REFINE with service.mode='disaggregated' (one-pass) or 'colocated' (fused)"
        )
    if config.rollout.engine == "vllm":
        from rollout_workers.vllm_engine import vllm_available

        if not vllm_available():  # else every rollout worker dies on import, restarted until the run gives up
            raise ValueError(f"rollout.engine='vllm' needs vLLM, which this Python ({sys.executable}) does not have: "
                             f"create its environment with `bash scripts/setup_vllm_env.sh` and run "
                             f"`.venv-vllm/bin/refine`")
    from refine.algorithm.rewards import check_run_reward

    # Both modes, before anything starts: imports refine.reward_modules, names the registered rewards, and
    # refuses a text reward where no reward replica decodes text.
    check_run_reward(config.refine.reward, config.refine.reward_modules, decodes_text=service.mode == "disaggregated")
    if service.mode == "colocated" and config.train.mini_batches > 1:
        raise ValueError(f"train.mini_batches={config.train.mini_batches} needs service.mode='disaggregated': the "
                         f"colocated fused step samples its rollouts in every update (on-policy)")
    if service.mode == "colocated" and config.train.micro_batches > 1:
        raise ValueError(f"train.micro_batches={config.train.micro_batches} needs service.mode='disaggregated': the "
                         f"colocated fused step samples its rollouts from the forward it trains, one per step")
    if service.mode == "colocated" and service.num_learners > 1:
        raise ValueError(f"service.num_learners={service.num_learners} needs service.mode='disaggregated': the "
                         f"colocated fused step samples its own rollouts and is not split across ranks")
    if service.mode == "disaggregated" and service.max_staleness < service.sync_interval - 1:
        raise ValueError(
            f"service.max_staleness={service.max_staleness} is below service.sync_interval - 1 = "
            f"{service.sync_interval - 1}: rollouts made between two weight publishes would always be dropped"
        )


def check_data_source(config: RunConfig) -> None:
    """Open data.source and data.eval_source as the data layer does (a missing path, an unknown format, a
    missing column fail here), before Ray, Redis and every actor start for nothing. The synthetic corpus is generated
    (a second or so): a data.seq_len too short for data.synthetic_tasks, or a data.min_length that keeps
    no document, fails here too."""
    data = config.data
    if data.eval_source is not None:  # the learner reads them: a bad source would fail it after Ray started
        try:
            heldout_documents(config, run_tokenizer(config))
        except (OSError, ValueError, ImportError) as exc:
            raise ConfigError(str(exc)) from None
    if data.source == "synthetic":
        tokenizer = run_tokenizer(config)  # outside the try: its own errors name the tokenizer setting
        try:
            synthetic_documents(config, tokenizer)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return
    try:
        RowSource(data.source, columns=[data.text_column], fmt=data.format)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"data.source={data.source!r}: {exc}") from None
