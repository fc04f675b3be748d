"""Per-token delta-rule recurrence: the slow, obviously-correct oracle every kernel is tested against.

Layouts follow flash-linear-attention's kernels: q, k [B, T, H, K]; v [B, T, H, V]; beta and the
log-decay g [B, T, H]; states [B, H, K, V]. With scale s (default K ** -0.5), at every token t:

    S <- exp(g_t) * S                              (gated delta rule only)
    S <- S + beta_t * k_t (v_t - S^T k_t)^T
    o_t = s * S^T q_t
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns (o [B, T, H, V], final state [B, H, K, V], states after positions[b, j] tokens [B * P, H, K, V])."""
    batch, seq_len, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim ** -0.5 if scale is None else scale
    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(q.dtype)
    history = [state]
    outputs = []
    for t in range(seq_len):
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t]
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, (v_t - predicted) * b_t[..., None])
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
        history.append(state)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, value_dim)
    position_states = None
    if positions is not None:
        stacked = torch.stack(history, dim=1)  # [B, T + 1, H, K, V]
        rows = torch.arange(batch, device=q.device)[:, None]
        position_states = stacked[rows, positions].flatten(0, 1)
    return o, state, position_states
