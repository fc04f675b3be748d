"""Token-by-token delta rule: one step for decoding, and a loop over steps for short inputs.

Conventions are those of refine/kernels/naive.py. The state is kept in float32 for half-precision
inputs (as fla's kernels do); outputs come back in q's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from refine.kernels.chunk import compute_dtype_for, validate_delta_rule_inputs


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
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.promote_types(compute_dtype_for(q.dtype), state.dtype)
    q_t, k_t, v_t, b_t = (x.to(dtype) for x in (q, k, v, beta))
    state = state.to(dtype)
    if g is not None:
        state = state * g.to(dtype).exp()[..., None, None]
    predicted = (k_t.unsqueeze(-2) @ state).squeeze(-2)  # S^T k: [B, H, V]
    delta = (v_t - predicted) * b_t[..., None]
    state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
    o = (q_t.unsqueeze(-2) @ state).squeeze(-2) * scale
    return o.to(q.dtype), state


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
    dtype = compute_dtype_for(q.dtype)
    state = (
        torch.zeros(batch, heads, key_dim, value_dim, dtype=dtype, device=q.device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    history = [state]
    outputs = []
    for t in range(seq_len):
        g_t = None if g is None else g[:, t]
        o_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], g_t, state, scale)
        outputs.append(o_t)
        history.append(state)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, value_dim, dtype=q.dtype)

    def states_at(at: Tensor) -> Tensor:
        validate_delta_rule_inputs(q, k, v, beta, g, initial_state, at)
        if at.shape[1] == 1 and bool((at == seq_len).all()):
            return state  # the common decoding case: the final state, no stacking
        stacked = torch.stack(history, dim=1)  # [B, T + 1, H, K, V]: the state after t tokens at index t
        rows = torch.arange(batch, device=q.device)[:, None]
        return stacked[rows, at.to(device=q.device, dtype=torch.long)].flatten(0, 1)

    if state_fn:
        return o, states_at
    return o, None if positions is None else states_at(positions)
