"""The checks a service run passes before Ray, Redis and any actor start: a configuration the service can run,
and data sources it can read."""

from __future__ import annotations

import logging
import sys

from refine.config import RunConfig, ServiceConfig
from refine.config_parsing import ConfigError
from refine.data.readers import RowSource
from refine.evaluation.heldout import heldout_documents
from refine.loop import first_batch_read
from refine.tokenizer import Tokenizer
from services.namespace_claim import check_key_ttl

__all__ = ["SERVICE_TRAIN_MODES", "check_data_source", "check_service_config", "with_service_train_mode"]

# What each service.mode trains, whatever train.mode says: the disaggregated learner takes the one-pass update on
# the rollout workers' rollouts, the colocated one the fused step. A train.mode given for the other is refused;
# one left at its default is recorded as the one trained (with_service_train_mode).
SERVICE_TRAIN_MODES = {"disaggregated": "onepass", "colocated": "fused"}
# Read only by service.mode='disaggregated': its rollout workers and reward replicas, its weight publishes and the
# staleness bound on their rollouts. (service.batches_in_flight paces the colocated learner's document batches too;
# service.worker_cpus, also unread there, is left alone: configs/service_tiny.yaml sizes its workers with it, and
# `--set service.mode=colocated` on that config is how the colocated mode is tried.)
DISAGGREGATED_ONLY = ("num_rollout_workers", "num_reward_replicas", "max_staleness", "sync_interval")


def with_service_train_mode(config: RunConfig) -> RunConfig:
    """`config` with the train.mode its service.mode trains (SERVICE_TRAIN_MODES): the config a service run
    records in its config.yaml, and the one the main job's REFINE branch runs on the service."""
    mode = SERVICE_TRAIN_MODES[config.service.mode]
    if config.train.mode == mode:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"mode": mode})})


def check_service_config(config: RunConfig) -> None:
    """Reject combinations the service cannot run, and settings it would not read, naming the fields."""
    service = config.service
    check_key_ttl(config)
    if config.train.mode in ("ntp", "reference"):
        raise ValueError(
            f"train.mode={config.train.mode!r} runs only in the single-process loop (refine train --local); the "
            f"service trains REFINE with service.mode='disaggregated' (one-pass) or 'colocated' (fused)"
        )
    trained = SERVICE_TRAIN_MODES[service.mode]
    if "mode" in config.train.model_fields_set and config.train.mode != trained:
        other = next(mode for mode, trains in SERVICE_TRAIN_MODES.items() if trains == config.train.mode)
        raise ValueError(
            f"train.mode={config.train.mode!r} is not what service.mode={service.mode!r} trains ({trained!r}, "
            f"whatever train.mode says): set service.mode={other!r} to train {config.train.mode!r} on the service, "
            f"or train.mode={trained!r} (or leave it out), or train {config.train.mode!r} in one process with --local"
        )
    if service.mode == "colocated":
        defaults = ServiceConfig.model_fields
        unread = [f"service.{name}={getattr(service, name)}" for name in DISAGGREGATED_ONLY
                  if name in service.model_fields_set and getattr(service, name) != defaults[name].default]
        if unread:
            raise ValueError(
                f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read with service.mode='colocated': "
                f"{'it paces' if len(unread) == 1 else 'they pace'} the rollout workers and reward replicas of "
                f"service.mode='disaggregated', and the colocated learner samples its own rollouts from its current "
                f"weights; leave {'it' if len(unread) == 1 else 'them'} out, or set service.mode='disaggregated'"
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
    smallest = config.train.batch_size // config.train.mini_batches  # mini-batch sizes differ by at most one
    if service.num_learners > smallest:
        raise ValueError(f"service.num_learners={service.num_learners} splits each mini-batch's documents across the "
                         f"learner ranks, but train.batch_size={config.train.batch_size} in train.mini_batches="
                         f"{config.train.mini_batches} makes mini-batches of {smallest}: ranks {smallest} and up "
                         f"would train on nothing; raise train.batch_size or lower service.num_learners")
    if service.mode == "disaggregated" and service.max_staleness < service.sync_interval - 1:
        raise ValueError(
            f"service.max_staleness={service.max_staleness} is below service.sync_interval - 1 = "
            f"{service.sync_interval - 1}: rollouts made between two weight publishes would always be dropped"
        )


def check_data_source(config: RunConfig, tokenizer: Tokenizer, start_cursor: int = 0) -> None:
    """Open data.source and data.eval_source as the data layer does (a missing path, an unknown format, a
    missing column fail here), then read the run's first document batch from `start_cursor` as the local loop
    does (refine.loop.first_batch_read): a source whose every document the filters drop, or whose first row is
    bad, fails here, naming data.source, before Ray, Redis and every actor start, and before the run directory
    (an earlier run's checkpoint, metrics.jsonl) is touched. The synthetic corpus is generated (a second or so):
    a data.seq_len too short for data.synthetic_tasks, or a data.min_length that keeps no document, fails
    here too."""
    data = config.data
    if data.eval_source is not None:  # the learner reads them: a bad source would fail it after Ray started
        try:
            heldout_documents(config, tokenizer)
        except (OSError, ValueError, ImportError) as exc:
            raise ConfigError(str(exc)) from None
    if data.source != "synthetic":
        try:
            RowSource(data.source, columns=[data.text_column], fmt=data.format)
        except (OSError, ValueError, ImportError) as exc:
            raise ConfigError(f"data.source={data.source!r}: {exc}") from None
    stream_log = logging.getLogger("refine.data.stream")
    level = stream_log.level
    stream_log.setLevel(logging.ERROR)  # what it drops or cuts: the run's own stream reads the same and says it
    try:
        first_batch_read(config, tokenizer, start_cursor)  # a file source's errors name it (DataSourceError)
    except ValueError as exc:
        if data.source != "synthetic":
            raise
        raise ConfigError(str(exc)) from None  # the synthetic corpus' settings: its errors name them
    finally:
        stream_log.setLevel(level)
