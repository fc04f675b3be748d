"""Snapshot decoding (refine.algorithm.rollout.decode): host reads and bad logits."""

import math

import pytest
import torch

from refine.algorithm.rollout import decode
from refine.config import RefineConfig
from refine.models import build_model

MODELS = {
    "delta_net": dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=40,
                      intermediate_size=48, use_short_conv=True),
    "gated_deltanet": dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16,
                           num_hidden_layers=2, vocab_size=40, intermediate_size=48),
}


def _prefix_states(name):
    torch.manual_seed(0)
    model = build_model(MODELS[name])
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_state=False, defer_states=True)
        positions = torch.tensor([[5, 17], [9, 30]])
        first_logits = out.logits[[0, 0, 1, 1], positions.flatten() - 1]
        return model, out.states_at(positions), first_logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decode_reads_the_device_once_per_batch(name, host_reads):
    """k tokens decode without a host read per step: the finiteness of every step's logits is read once."""
    model, states, first_logits = _prefix_states(name)
    cfg = RefineConfig(num_chunks=2, rollout_len=5, num_samples=3, temperature=0.9, top_p=0.9, top_k=10)
    reads, (tokens, logprobs, hidden) = host_reads(
        lambda: decode(model, states, first_logits, cfg, torch.Generator().manual_seed(2)))
    assert reads == 1
    assert tokens.shape == logprobs.shape == (12, 5) and hidden.shape == (12, 5, 32)
    assert ((tokens >= 0) & (tokens < 40)).all() and torch.isfinite(logprobs).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decode_rejects_logits_that_turn_non_finite_at_a_later_step(name):
    """The prefix predictions are finite; the states are not, so step 2's logits are NaN. The check,
    made once after the loop, still raises rather than handing back rollouts sampled from NaN."""
    model, states, first_logits = _prefix_states(name)
    states = states.map(lambda t: t * math.nan if t.is_floating_point() else t)
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=1)
    with pytest.raises(ValueError, match="logits must be finite"):
        decode(model, states, first_logits, cfg, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="logits must be finite"):
        decode(model, states, first_logits * math.inf, cfg, torch.Generator().manual_seed(2))
