"""The learner's update steps report the time of every phase they run (refine_step_seconds{phase}), and train
on the rewards they were sent as the single-process loop would."""

import copy
import time

import pytest
import torch

from learner.update import LEARNER_PHASES, fused_update, onepass_update, rollouts_from_batch
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import advantages_for, score_rollouts
from refine.config import RunConfig
from refine.models import build_model
from refine.step import rollout_batch_update
from services.messages import DocumentBatch, ScoredBatch


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


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reward_dtype", [torch.float32, torch.float64])
def test_the_learner_trains_on_the_rewards_it_was_sent_as_the_single_process_loop_does(
    model_dtype: torch.dtype, reward_dtype: torch.dtype
) -> None:
    config, model, _, ids, lengths = _setup()
    model = model.to(model_dtype)
    rollouts = snapshot_rollouts(model, ids, lengths, config.refine, torch.Generator().manual_seed(2))
    # Rewards that differ only below float32's resolution around 0.5: cut to float32, every group would be
    # constant (advantage 0); in float64 they rank the rollouts.
    spread = torch.randn(rollouts.num_rollouts, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rewards = (0.5 + 1e-9 * spread if reward_dtype == torch.float64 else score_rollouts(rollouts, config.refine))
    rewards = rewards.to(reward_dtype)
    documents = DocumentBatch(doc_ids=["a", "b"], token_ids=ids, lengths=lengths)
    scored = ScoredBatch(document_batch_id=documents.batch_id, policy_version=0, worker_id="w",
                         num_samples=rollouts.num_samples, rollout_len=rollouts.rollout_len,
                         positions=rollouts.positions, entropies=rollouts.entropies, rollout_tokens=rollouts.tokens,
                         behaviour_logprobs=rollouts.logprobs, rewards=rewards, reward_type="cosine")
    received = rollouts_from_batch(scored)
    assert received.rewards.dtype == reward_dtype

    single = copy.deepcopy(model)
    learner = onepass_update(model, torch.optim.AdamW(model.parameters(), lr=1e-3), ids, lengths, received, config)
    rollouts.rewards = rewards  # the single-process loop scores its rollouts itself and keeps their dtype
    loop = rollout_batch_update("onepass", single, torch.optim.AdamW(single.parameters(), lr=1e-3), ids, lengths,
                                rollouts, config)
    assert not learner.skipped and learner.stats["policy_loss"] == loop.stats["policy_loss"]
    assert bool(advantages_for(received.rewards, received, config.refine).any())  # not cut to constant groups
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), single.parameters()))
