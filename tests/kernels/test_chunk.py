"""chunk_delta_rule against the per-token oracle, in float64: outputs, states at positions, gradients."""

from __future__ import annotations

import pytest
import torch

from refine.kernels.chunk import UTTransform, chunk_delta_rule, invert_unit_lower
from refine.kernels.naive import naive_delta_rule

TOL = dict(rtol=1e-10, atol=1e-10)
GRAD_NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def _call(kernel, inputs, positions, **kwargs):
    q, k, v, beta, g, h0 = (inputs[n] for n in GRAD_NAMES)
    return kernel(q, k, v, beta, g, initial_state=h0, positions=positions, **kwargs)


def _weighted_loss(o, states, seed=1, use_outputs=True):
    gen = torch.Generator().manual_seed(seed)
    w_o = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    w_s = torch.randn(states.shape, generator=gen, dtype=states.dtype)
    return ((o * w_o).sum() if use_outputs else 0) + (states * w_s).sum()


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("seq_len", [0, 1, 63, 64, 65, 200])
def test_forward_matches_naive(make_inputs, make_positions, gated, with_initial_state, seq_len):
    inputs = make_inputs(seq_len=seq_len, gated=gated, with_initial_state=with_initial_state)
    positions = make_positions(2, seq_len, 64)
    o, states = _call(chunk_delta_rule, inputs, positions)
    o_ref, final_ref, states_ref = _call(naive_delta_rule, inputs, positions)
    assert o.shape == o_ref.shape and states.shape == states_ref.shape
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(states, states_ref, **TOL)
    batch_of_row = torch.arange(2).repeat_interleave(positions.shape[1])
    final_rows = positions.flatten() == seq_len
    torch.testing.assert_close(states[final_rows], final_ref[batch_of_row[final_rows]], **TOL)


# states_only: a loss of the states at positions alone. Picked states (several from one chunk) hand
# sparse gradients to the chunk loop's backward with no dense gradient of the outputs to join.
@pytest.mark.parametrize("use_outputs", [True, False], ids=["outputs_and_states", "states_only"])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("seq_len,chunk_size", [(1, 64), (4, 4), (13, 13), (37, 16), (64, 32), (100, 32)])
def test_gradients_match_naive(make_inputs, make_positions, gated, seq_len, chunk_size, use_outputs):
    positions = make_positions(2, seq_len, chunk_size, seed=seq_len)
    grads = {}
    kernels = [("chunk", chunk_delta_rule, dict(chunk_size=chunk_size)), ("naive", naive_delta_rule, {})]
    for name, kernel, kwargs in kernels:
        inputs = make_inputs(seq_len=seq_len, gated=gated, requires_grad=True)
        out = _call(kernel, inputs, positions, **kwargs)
        loss = _weighted_loss(out[0], out[-1], use_outputs=use_outputs)
        loss.backward()
        grads[name] = {n: inputs[n].grad for n in GRAD_NAMES if inputs[n] is not None}
    for n, grad in grads["naive"].items():
        if grad is None:  # q, when only the states are in the loss
            assert not use_outputs and n == "q" and grads["chunk"][n] is None, n
            continue
        assert grads["chunk"][n] is not None, n
        assert grads["chunk"][n].layout == torch.strided, n
        assert grad.abs().max() > 0, n  # the comparison would be vacuous otherwise
        torch.testing.assert_close(grads["chunk"][n], grad, **TOL, msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_chunk_size_and_padding_do_not_change_results(make_inputs, make_positions, gated):
    inputs = make_inputs(seq_len=50, gated=gated)
    positions = make_positions(2, 50, 7)
    o_ref, states_ref = _call(chunk_delta_rule, inputs, positions, chunk_size=50)
    for chunk_size in (1, 7, 16, 64, 128):
        o, states = _call(chunk_delta_rule, inputs, positions, chunk_size=chunk_size)
        torch.testing.assert_close(o, o_ref, **TOL)
        torch.testing.assert_close(states, states_ref, **TOL)


def test_positions_none_returns_no_states(make_inputs):
    inputs = make_inputs(seq_len=10)
    o, states = _call(chunk_delta_rule, inputs, None)
    assert states is None and o.shape == (2, 10, 2, 6)


def test_custom_scale_matches_naive(make_inputs):
    inputs = make_inputs(seq_len=70, gated=True)
    o, _ = _call(chunk_delta_rule, inputs, None, scale=0.7)
    o_ref, _, _ = _call(naive_delta_rule, inputs, None, scale=0.7)
    torch.testing.assert_close(o, o_ref, **TOL)


def test_strong_decay_stays_finite_with_gradients(make_inputs):
    inputs = make_inputs(seq_len=130, gated=True, requires_grad=True)
    with torch.no_grad():
        inputs["g"].mul_(200.0)  # log-decays down to about -1000 per token: exp underflows inside a chunk
    positions = torch.tensor([[0, 5, 64, 130], [1, 63, 129, 100]])
    o, states = _call(chunk_delta_rule, inputs, positions)
    detached = {n: None if t is None else t.detach() for n, t in inputs.items()}
    o_ref, _, states_ref = _call(naive_delta_rule, detached, positions)
    torch.testing.assert_close(o.detach(), o_ref, **TOL)
    torch.testing.assert_close(states.detach(), states_ref, **TOL)
    _weighted_loss(o, states).backward()
    for n in GRAD_NAMES:
        assert torch.isfinite(inputs[n].grad).all(), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(make_inputs, make_positions, dtype):
    inputs64 = make_inputs(seq_len=130, gated=True)
    positions = make_positions(2, 130, 64)
    o64, states64 = _call(chunk_delta_rule, inputs64, positions)
    low = {n: None if t is None else t.to(dtype) for n, t in inputs64.items()}
    o, states = _call(chunk_delta_rule, low, positions)
    assert o.dtype == dtype and states.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (o.double() - o64).norm() / o64.norm() < tol
    assert (states.double() - states64).norm() / states64.norm() < tol


@pytest.mark.parametrize(
    "field,change,message",
    [
        ("positions", lambda p: p + 100, "positions must lie in 0..T"),
        ("positions", lambda p: p - 100, "positions must lie in 0..T"),
        ("positions", lambda p: p[:1], "positions must be \\[B, P\\]"),
        ("positions", lambda p: p.double(), "positions must be an integer tensor"),
        ("beta", lambda b: b[:, :-1], "beta must be \\[B, T, H\\]"),
        ("g", lambda g: g[..., None], "g must be \\[B, T, H\\]"),
        ("v", lambda v: v[:1], "v must be \\[B, T, H, V\\]"),
        ("initial_state", lambda s: s[..., :-1], "initial_state must be \\[B, H, K, V\\]"),
    ],
)
def test_bad_input_raises_naming_the_field(make_inputs, field, change, message):
    inputs = make_inputs(seq_len=20, gated=True)
    positions = torch.tensor([[0, 20], [3, 7]])
    if field == "positions":
        positions = change(positions)
    else:
        inputs[field] = change(inputs[field])
    with pytest.raises(ValueError, match=message):
        _call(chunk_delta_rule, inputs, positions)


def test_bad_chunk_size_raises(make_inputs):
    with pytest.raises(ValueError, match="chunk_size"):
        _call(chunk_delta_rule, make_inputs(seq_len=4), None, chunk_size=0)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 64])
def test_invert_unit_lower_matches_dense_inverse(size):
    gen = torch.Generator().manual_seed(size)
    lower = 0.2 * torch.randn(5, size, size, generator=gen, dtype=torch.float64)
    expected = torch.linalg.inv(torch.tril(lower, -1) + torch.eye(size, dtype=torch.float64))
    torch.testing.assert_close(invert_unit_lower(lower), expected, rtol=1e-10, atol=1e-10)


def test_ut_transform_gradient():
    gen = torch.Generator().manual_seed(0)
    lower = (0.3 * torch.randn(3, 10, 10, generator=gen, dtype=torch.float64)).requires_grad_()
    keys = torch.randn(3, 10, 4, generator=gen, dtype=torch.float64).requires_grad_()
    values = torch.randn(3, 10, 5, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(UTTransform.apply, (lower, keys, values))


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_float32_stays_accurate_with_repeated_keys(make_inputs, gated):
    """Identical keys and beta = 1 make the UT system's inverse as large as it gets (binomial growth)."""
    inputs = make_inputs(batch=1, seq_len=128, heads=1, gated=gated)
    inputs["k"] = inputs["k"][:, :1].expand_as(inputs["k"]).contiguous()
    inputs["beta"] = torch.ones_like(inputs["beta"])
    o64, _ = _call(chunk_delta_rule, inputs, None)
    o_ref, _, _ = _call(naive_delta_rule, inputs, None)
    torch.testing.assert_close(o64, o_ref, **TOL)
    low = {n: None if t is None else t.float() for n, t in inputs.items()}
    o32, _ = _call(chunk_delta_rule, low, None)
    assert (o32.double() - o_ref).abs().max() < 1e-4


def test_float32_stays_accurate_after_a_reset_decay_inside_a_chunk(make_inputs, make_positions):
    """A token whose log-decay is huge (a gate's reset) made every later exp(gamma_i - gamma_j) of its chunk the
    difference of two large, nearly equal float32 sums: relative errors of 4e-3 in outputs, states and gradients,
    against 2e-7 for the per-token recurrence (which never forms that difference)."""
    inputs = make_inputs(batch=1, seq_len=200, heads=2, gated=True, requires_grad=True)
    with torch.no_grad():
        inputs["g"].fill_(-0.01)
        inputs["g"][:, 3::17] = -1e5  # about four resets per 64-token chunk
    positions = make_positions(1, 200, 64)
    o64, states64 = _call(naive_delta_rule, inputs, positions)[::2]
    _weighted_loss(o64, states64).backward()
    grads64 = {n: inputs[n].grad for n in GRAD_NAMES if inputs[n] is not None}
    low = {n: None if t is None else t.detach().float().requires_grad_() for n, t in inputs.items()}
    o, states = _call(chunk_delta_rule, low, positions)
    _weighted_loss(o.double(), states.double()).backward()

    def relative(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm())

    assert relative(o, o64) < 1e-5 and relative(states, states64) < 1e-5
    for name, grad in grads64.items():
        assert relative(low[name].grad, grad) < 1e-4, name
