"""recurrent_delta_rule and delta_rule_step against the per-token oracle, in float64."""

from __future__ import annotations

import pytest
import torch

from refine.kernels.chunk import chunk_delta_rule
from refine.kernels.naive import naive_delta_rule
from refine.kernels.recurrent import delta_rule_step, recurrent_delta_rule

TOL = dict(rtol=1e-10, atol=1e-10)
GRAD_NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def _call(kernel, inputs, positions, **kwargs):
    q, k, v, beta, g, h0 = (inputs[n] for n in GRAD_NAMES)
    return kernel(q, k, v, beta, g, initial_state=h0, positions=positions, **kwargs)


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("seq_len", [0, 1, 16, 23])
def test_recurrent_matches_naive_with_gradients(make_inputs, make_positions, gated, with_initial_state, seq_len):
    positions = make_positions(2, seq_len, 8)
    results = {}
    for name, kernel in [("recurrent", recurrent_delta_rule), ("naive", naive_delta_rule)]:
        inputs = make_inputs(seq_len=seq_len, gated=gated, with_initial_state=with_initial_state, requires_grad=True)
        out = _call(kernel, inputs, positions)
        o, states = out[0], out[-1]
        gen = torch.Generator().manual_seed(3)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        loss = loss + (states * torch.randn(states.shape, generator=gen, dtype=states.dtype)).sum()
        if loss.requires_grad:  # T = 0 without an initial state depends on no input
            loss.backward()
        grads = {n: inputs[n].grad for n in GRAD_NAMES if inputs[n] is not None and inputs[n].grad is not None}
        results[name] = (o.detach(), states.detach(), grads)
    (o, states, grads), (o_ref, states_ref, grads_ref) = results["recurrent"], results["naive"]
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(states, states_ref, **TOL)
    assert grads.keys() == grads_ref.keys()
    for n, grad in grads_ref.items():
        # A decay of a zero state (first token, no initial state) genuinely has zero gradient.
        if seq_len > 0 and not (n == "g" and seq_len == 1 and not with_initial_state):
            assert grad.abs().max() > 0, n
        torch.testing.assert_close(grads[n], grad, **TOL, msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_recurrent_without_gradients_matches_naive(make_inputs, make_positions, gated):
    # Without gradients the loop runs outside its autograd node (decoding's path): same values.
    inputs = make_inputs(seq_len=9, gated=gated, with_initial_state=True, requires_grad=True)
    positions = make_positions(2, 9, 4)
    with torch.no_grad():
        o, states = _call(recurrent_delta_rule, inputs, positions)
    o_ref, states_ref = _call(naive_delta_rule, inputs, positions)[::2]
    assert not o.requires_grad and not states.requires_grad
    torch.testing.assert_close(o, o_ref.detach(), **TOL)
    torch.testing.assert_close(states, states_ref.detach(), **TOL)


def test_recurrent_without_positions_returns_no_states(make_inputs):
    inputs = make_inputs(seq_len=5)
    o, states = _call(recurrent_delta_rule, inputs, None)
    assert states is None and o.shape == (2, 5, 2, 6)


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_steps_reproduce_the_sequence(make_inputs, gated):
    inputs = make_inputs(seq_len=12, gated=gated)
    o_ref, final_ref, _ = _call(naive_delta_rule, inputs, None, scale=0.5)
    state = inputs["initial_state"]
    for t in range(12):
        g_t = None if inputs["g"] is None else inputs["g"][:, t]
        o_t, state = delta_rule_step(
            inputs["q"][:, t], inputs["k"][:, t], inputs["v"][:, t], inputs["beta"][:, t], g_t, state, scale=0.5
        )
        torch.testing.assert_close(o_t, o_ref[:, t], **TOL)
    torch.testing.assert_close(state, final_ref, **TOL)


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_decoding_from_a_position_state_continues_the_sequence(make_inputs, gated):
    """The chunk kernel's state after p tokens, stepped forward, gives the full sequence's outputs after p."""
    seq_len = 90
    inputs = make_inputs(seq_len=seq_len, gated=gated)
    positions = torch.tensor([[37], [70]])
    _, states = _call(chunk_delta_rule, inputs, positions, chunk_size=16)
    o_ref, _, _ = _call(naive_delta_rule, inputs, None)
    for b, p in enumerate(positions[:, 0].tolist()):
        state = states[b : b + 1]
        for t in range(p, seq_len):
            g_t = None if inputs["g"] is None else inputs["g"][b : b + 1, t]
            step_inputs = (inputs[n][b : b + 1, t] for n in ("q", "k", "v", "beta"))
            o_t, state = delta_rule_step(*step_inputs, g_t, state)
            torch.testing.assert_close(o_t, o_ref[b : b + 1, t], **TOL)


def test_step_keeps_float32_state_for_bfloat16_inputs(make_inputs):
    inputs = make_inputs(seq_len=1, gated=True, dtype=torch.bfloat16)
    state = inputs["initial_state"].float()
    o, new_state = delta_rule_step(*(inputs[n][:, 0] for n in ("q", "k", "v", "beta", "g")), state)
    assert o.dtype == torch.bfloat16 and new_state.dtype == torch.float32


@pytest.mark.parametrize(
    "field,message",
    [
        ("k", "q and k must both be"),
        ("v", "v must be"),
        ("beta", "beta must be"),
        ("g", "g must be"),
        ("state", "state must be"),
    ],
)
def test_step_bad_input_raises_naming_the_field(make_inputs, field, message):
    inputs = make_inputs(seq_len=1, gated=True)
    args = {n: inputs[n][:, 0] for n in ("q", "k", "v", "beta", "g")}
    args["state"] = inputs["initial_state"]
    args[field] = args[field][..., :-1] if field in ("k", "state") else args[field][:1]
    with pytest.raises(ValueError, match=message):
        delta_rule_step(args["q"], args["k"], args["v"], args["beta"], args["g"], args["state"])
