"""Token-by-token delta rule: one step for decoding, and a loop over steps for short inputs.

Conventions are those of refine/kernels/naive.py. The state is kept in float32 for half-precision
inputs (as fla's kernels do); outputs come back in q's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from refine.kernels.chunk import compute_dtype_for, validate_delta_rule_inputs, without_autocast


def delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    state: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One token: q, k [B, H, K]; v [B, H, V]; beta, g [B, H] (g may be None); state [B, H, K, V].

    Returns (o [B, H, V] in q's dtype, new state [B, H, K, V])."""
    if k.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 3 or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must be [B, H, V] with B, H = {tuple(k.shape[:2])}, got {tuple(v.shape)}")
    if beta.shape != k.shape[:2]:
        raise ValueError(f"beta must be [B, H] = {tuple(k.shape[:2])}, got {tuple(beta.shape)}")
    if g is not None and g.shape != k.shape[:2]:
        raise ValueError(f"g must be [B, H] = {tuple(k.shape[:2])}, got {tuple(g.shape)}")
    expected_state = (*k.shape, v.shape[-1])
    if tuple(state.shape) != expected_state:
        raise ValueError(f"state must be [B, H, K, V] = {expected_state}, got {tuple(state.shape)}")
    # One token of the sequence form (its TokenRecurrence does the arithmetic), in the state's precision
    # when that is wider than the inputs' compute precision.
    dtype = torch.promote_types(compute_dtype_for(q.dtype), state.dtype)
    o, states_at = recurrent_delta_rule(
        *(x.to(dtype).unsqueeze(1) for x in (q, k, v, beta)), None if g is None else g.to(dtype).unsqueeze(1),
        scale=scale, initial_state=state.to(dtype), state_fn=True,
    )
    return o[:, 0].to(q.dtype), states_at(None)


@without_autocast
def recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    positions: Tensor | None = None,
    state_fn: bool = False,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Same contract as chunk_delta_rule, computed one token at a time (meant for short inputs)."""
    validate_delta_rule_inputs(q, k, v, beta, g, initial_state, positions)
    batch, seq_len, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim ** -0.5 if scale is None else scale
    dtype = compute_dtype_for(q.dtype)
    state = (
        torch.zeros(batch, heads, key_dim, value_dim, dtype=dtype, device=q.device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    if seq_len == 0:  # nothing to run: the state passes through untouched
        o, after = v.new_zeros(batch, 0, heads, value_dim, dtype=q.dtype), state.unsqueeze(0)[:0]
    else:
        inputs = (q, k, v, beta, g, state)
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
            o, after = TokenRecurrence.apply(q, k, v, beta, g, state, scale)  # [T, B, H, K, V]: after token t
        else:  # decoding: the same loop without the autograd node's bookkeeping
            o, after, _ = _token_loop(q, k, v, beta, g, state, scale)

    def states_at(at: Tensor | None) -> Tensor:
        if at is None:  # every row's end (decoding): known without reading any values, so no device sync
            return after[-1] if seq_len > 0 else state
        validate_delta_rule_inputs(q, k, v, beta, g, initial_state, at)
        at = at.to(device=q.device, dtype=torch.long)
        history = torch.cat([state[None], after])  # the state after p tokens at index p
        return history[at, torch.arange(batch, device=q.device)[:, None]].flatten(0, 1)

    if state_fn:
        return o, states_at
    return o, None if positions is None else states_at(positions)


def _per_step(x: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, T, H, D] -> [T, B * H, 1, D] (or [B, T, H] -> [T, B * H, 1, 1]) in the compute dtype."""
    x = x.to(dtype)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    return x.transpose(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], 1, x.shape[-1])


def _token_loop(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor,
                scale: float) -> tuple[Tensor, Tensor, tuple]:
    """The forward loop: (o [B, T, H, V], states after each token [T, B, H, K, V], what backward needs)."""
    batch, seq_len, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    dtype = state.dtype
    q_s, k_s, v_s, b_s = (_per_step(x, dtype) for x in (q, k, v, beta))
    a_s = None if g is None else _per_step(g, dtype).exp()
    initial = state.reshape(batch * heads, key_dim, value_dim)
    after = state.new_empty(seq_len, batch * heads, key_dim, value_dim)
    outputs = state.new_empty(seq_len, batch * heads, 1, value_dim)
    for t in range(seq_len):
        before = initial if t == 0 else after[t - 1]
        if a_s is not None:
            before = before * a_s[t]
        delta = (v_s[t] - torch.bmm(k_s[t], before)) * b_s[t]
        torch.addcmul(before, k_s[t].transpose(1, 2), delta, out=after[t])  # outer product: elementwise
        torch.bmm(q_s[t], after[t], out=outputs[t])
    o = (outputs * scale).view(seq_len, batch, heads, value_dim).transpose(0, 1).to(q.dtype)
    return o, after.view(seq_len, batch, heads, key_dim, value_dim), (q_s, k_s, v_s, b_s, a_s, initial, after)


class TokenRecurrence(torch.autograd.Function):
    """The per-token loop as one autograd node, with a hand-written reverse loop.

    Recording every token's small ops in autograd costs more than the arithmetic for the few-token
    inputs this path serves (teacher-forced rollouts, decoding); here each direction is a handful of
    batched [B * H] matrix products per token. Per token, with S the state before it and a = exp(g):

        S' = a S;  delta = beta (v - S'^T k);  S_new = S' + k delta^T;  o = scale S_new^T q.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, state, scale):
        o, after, saved = _token_loop(q, k, v, beta, g, state, scale)
        ctx.set_materialize_grads(False)  # an unused output (often the states) needs no zero gradient
        ctx.scale, ctx.shapes = scale, (*k.shape, v.shape[-1])
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, beta.dtype, None if g is None else g.dtype, state.dtype)
        ctx.save_for_backward(*saved)
        return o, after

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o, grad_after):
        q_s, k_s, v_s, b_s, a_s, initial, after = ctx.saved_tensors
        batch, seq_len, heads, key_dim, value_dim = ctx.shapes
        scale, rows = ctx.scale, batch * heads
        dtype = after.dtype
        grad_o = (torch.zeros(seq_len, rows, 1, value_dim, dtype=dtype, device=after.device) if grad_o is None
                  else grad_o.to(dtype).transpose(0, 1).reshape(seq_len, rows, 1, value_dim))
        if grad_after is not None:
            grad_after = grad_after.to(dtype).reshape(seq_len, rows, key_dim, value_dim)
        grads = {name: torch.empty_like(x) for name, x in (("q", q_s), ("k", k_s), ("v", v_s), ("beta", b_s))}
        grad_a = None if a_s is None else torch.empty_like(a_s)
        # Gradient of the state after token t, accumulated from the tokens after it.
        running = after.new_zeros(rows, key_dim, value_dim) if grad_after is None else grad_after[-1].clone()
        for t in reversed(range(seq_len)):
            previous = initial if t == 0 else after[t - 1]
            before = previous if a_s is None else previous * a_s[t]
            residual = v_s[t] - torch.bmm(k_s[t], before)  # v - S'^T k
            delta = residual * b_s[t]
            running.addcmul_(q_s[t].transpose(1, 2), grad_o[t], value=scale)  # o = scale S_new^T q
            grads["q"][t] = torch.bmm(grad_o[t], after[t].transpose(1, 2)) * scale
            grad_delta = torch.bmm(k_s[t], running)  # S_new = S' + k delta^T
            grads["k"][t] = torch.bmm(delta, running.transpose(1, 2))
            grads["v"][t] = grad_delta * b_s[t]
            grads["beta"][t] = (residual * grad_delta).sum(-1, keepdim=True)
            grad_predicted = -grad_delta * b_s[t]  # delta = beta (v - S'^T k)
            grads["k"][t] += torch.bmm(grad_predicted, before.transpose(1, 2))
            running.addcmul_(k_s[t].transpose(1, 2), grad_predicted)  # now the gradient of S'
            if a_s is not None:  # S' = a S
                grad_a[t] = (running * previous).sum((-1, -2), keepdim=True)
                running.mul_(a_s[t])
            if grad_after is not None and t > 0:
                running += grad_after[t - 1]

        def back(x: Tensor, like_dtype: torch.dtype, per_head_scalar: bool = False) -> Tensor:
            x = x.view(seq_len, batch, heads, x.shape[-1]).transpose(0, 1)
            return (x[..., 0] if per_head_scalar else x).to(like_dtype)

        q_dtype, k_dtype, v_dtype, beta_dtype, g_dtype, state_dtype = ctx.dtypes
        grad_g = None if a_s is None else back(grad_a * a_s, g_dtype, per_head_scalar=True)  # da/dg = a
        return (back(grads["q"], q_dtype), back(grads["k"], k_dtype), back(grads["v"], v_dtype),
                back(grads["beta"], beta_dtype, per_head_scalar=True), grad_g,
                running.view(batch, heads, key_dim, value_dim).to(state_dtype), None)
