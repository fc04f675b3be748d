"""The learner's update steps report the time of every phase they run (refine_step_seconds{phase})."""

import time

import torch

from learner.update import LEARNER_PHASES, fused_update, onepass_update
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import score_rollouts
from refine.config import RunConfig
from refine.models import build_model


def _setup():
    config = RunConfig()
    config.refine.num_chunks, config.refine.margin = 4, 4
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=32, num_hidden_layers=1,
                             num_heads=2, intermediate_size=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(1))
    return config, model, optimizer, ids, torch.tensor([96, 80])


def _phases(stats: dict) -> dict[str, float]:
    return {key.removesuffix("_seconds"): value for key, value in stats.items() if key.endswith("_seconds")}


def test_fused_update_times_each_stage_of_the_step():
    config, model, optimizer, ids, lengths = _setup()
    started = time.perf_counter()
    outcome = fused_update(model, optimizer, ids, lengths, config, torch.Generator().manual_seed(2))
    wall = time.perf_counter() - started
    phases = _phases(outcome.stats)
    assert set(phases) == set(LEARNER_PHASES)
    assert all(seconds > 0 for seconds in phases.values())
    assert sum(phases.values()) <= wall  # disjoint stages of one call


def test_onepass_update_times_the_loss_and_the_backward_step():
    config, model, optimizer, ids, lengths = _setup()
    rollouts = snapshot_rollouts(model, ids, lengths, config.refine, torch.Generator().manual_seed(2))
    rollouts.rewards = score_rollouts(rollouts, config.refine)
    started = time.perf_counter()
    outcome = onepass_update(model, optimizer, ids, lengths, rollouts, config)
    wall = time.perf_counter() - started
    phases = _phases(outcome.stats)
    assert set(phases) == {"forward", "backward_step"} and set(phases) <= set(LEARNER_PHASES)
    assert all(seconds > 0 for seconds in phases.values()) and sum(phases.values()) <= wall


def test_onepass_update_takes_an_optimizer_step_per_mini_batch():
    config, model, optimizer, ids, lengths = _setup()
    config.train.batch_size, config.train.mini_batches = 2, 2
    rollouts = snapshot_rollouts(model, ids, lengths, config.refine, torch.Generator().manual_seed(2))
    rollouts.rewards = score_rollouts(rollouts, config.refine)
    outcome = onepass_update(model, optimizer, ids, lengths, rollouts, config)
    assert not outcome.skipped
    assert all(int(state["step"]) == 2 for state in optimizer.state.values())  # AdamW stepped twice
    assert set(_phases(outcome.stats)) == {"forward", "backward_step"}  # both steps' time in the same phases
