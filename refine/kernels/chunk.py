"""Chunked (WY / UT-transform) delta rule in pure PyTorch, with states at arbitrary positions.

Conventions are those of refine/kernels/naive.py (fla layouts, S <- exp(g_t) S before the update,
o_t = scale * S_t^T q_t after it). Within a chunk of C tokens with chunk-start state S0 and
inclusive cumulative log-decay gamma_i = g_1 + ... + g_i, the state after token i is

    S_i = exp(gamma_i) S0 + sum_{j <= i} exp(gamma_i - gamma_j) k_j u_j^T,

where the corrected values u solve the unit lower-triangular system (I + A) u = beta (v - exp(gamma) K S0)
with A_ij = beta_i exp(gamma_i - gamma_j) k_i . k_j for j < i. Hence u = U0 - W S0 with
W = (I + A)^-1 diag(beta exp(gamma)) K and U0 = (I + A)^-1 diag(beta) V, both computed for every chunk
at once; only u and the chunk-end state need the sequential loop over chunks.

Because the system is lower-triangular, the first r rows of u do not depend on the rest of the chunk,
so the state after r tokens of a chunk is exp(gamma_r) S0 + sum_{j <= r} exp(gamma_r - gamma_j) k_j u_j^T
with the very same u: states at any position come out of the one pass, exactly and with gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from refine.kernels.picks import densify, pick


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed (and their states kept) in float32, as fla's kernels do."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def without_autocast(fn: Callable) -> Callable:
    """Run a kernel with autocast off on its tensors' device.

    The kernels choose their own compute precision (float32 for half-precision inputs, as fla's do);
    autocast would otherwise recast their matrix products to bfloat16 one by one and mix dtypes
    inside them. Rollouts under autocast (as the paper's code generates) thus keep float32 states.
    """
    @functools.wraps(fn)
    def wrapper(first: Tensor, *args, **kwargs):
        device = first.device.type
        if not torch.is_autocast_enabled(device):
            return fn(first, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(first, *args, **kwargs)
    return wrapper


def validate_delta_rule_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    positions: Tensor | None,
) -> None:
    """Raises ValueError naming the offending argument when shapes or values do not fit together."""
    if k.dim() != 4:
        raise ValueError(f"k must be [B, T, H, K], got shape {tuple(k.shape)}")
    batch, seq_len, heads, key_dim = k.shape
    if q.shape != k.shape:
        raise ValueError(f"q must have k's shape {tuple(k.shape)}, got {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {batch, seq_len, heads}, got {tuple(v.shape)}")
    if beta.shape != k.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {tuple(k.shape[:3])}, got {tuple(beta.shape)}")
    if g is not None and g.shape != k.shape[:3]:
        raise ValueError(f"g must be [B, T, H] = {tuple(k.shape[:3])}, got {tuple(g.shape)}")
    expected_state = (batch, heads, key_dim, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected_state:
        raise ValueError(f"initial_state must be [B, H, K, V] = {expected_state}, got {tuple(initial_state.shape)}")
    if positions is not None:
        if positions.dim() != 2 or positions.shape[0] != batch:
            raise ValueError(f"positions must be [B, P] with B = {batch}, got shape {tuple(positions.shape)}")
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"positions must be an integer tensor, got dtype {positions.dtype}")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) > seq_len):
            raise ValueError(
                f"positions must lie in 0..T = 0..{seq_len}, got values from "
                f"{int(positions.min())} to {int(positions.max())}"
            )


def _to_chunks(x: Tensor, num_chunks: int, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """[B, T, H, ...] -> [N, B, H, C, ...], zero-padded at the end: chunk-major so the loop reads contiguous slices."""
    batch, seq_len, heads = x.shape[:3]
    pad = num_chunks * chunk_size - seq_len
    x = x.to(dtype)
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
    x = x.reshape(batch, num_chunks, chunk_size, heads, *x.shape[3:])
    order = (1, 0, 3, 2) + tuple(range(4, x.dim()))
    return x.permute(order).contiguous()


@without_autocast
def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    positions: Tensor | None = None,
    chunk_size: int = 64,
    state_fn: bool = False,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Delta rule (gated when g is given) over a whole sequence.

    q, k [B, T, H, K] (already l2-normalized); v [B, T, H, V]; beta, g [B, T, H]; initial_state [B, H, K, V];
    positions [B, P], integers in 0..T ("tokens consumed").
    Returns o [B, T, H, V] in q's dtype and, when positions is given, the state after positions[b, j]
    tokens at row b * P + j of a [B * P, H, K, V] tensor (float32 for half-precision inputs).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    validate_delta_rule_inputs(q, k, v, beta, g, initial_state, positions)
    batch, seq_len, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim ** -0.5 if scale is None else scale
    dtype = compute_dtype_for(q.dtype)
    size = chunk_size
    # At least one chunk, so T = 0 runs the same code; padded tokens have k = v = q = beta = g = 0,
    # which leaves the state untouched (no write, decay exp(0) = 1).
    num_chunks = max(1, -(-seq_len // size))

    # Every chunk of every sequence and head is one matrix of a batch: [G, C, D] with G = N * B * H,
    # chunk-major so that the loop over chunks reads contiguous slices.
    shape = (num_chunks, batch, heads, size)
    q_c = _to_chunks(q, num_chunks, size, dtype).view(-1, size, key_dim) * scale
    k_c = _to_chunks(k, num_chunks, size, dtype).view(-1, size, key_dim)
    v_c = _to_chunks(v, num_chunks, size, dtype).view(-1, size, value_dim)
    beta_c = _to_chunks(beta, num_chunks, size, dtype).view(-1, size, 1)
    # Cumulative log-decays in float64: exp(gamma_i - gamma_j) of two large, nearly equal sums keeps few digits of
    # their difference in float32 once a chunk holds a strong decay (a gate's reset), which the per-token
    # recurrence never forms. Differences are taken wide, then cast (the [C, C] matrix is wide only in passing).
    gamma = None if g is None else _to_chunks(g, num_chunks, size, torch.float64).view(-1, size).cumsum(-1)
    gamma_exp = None if gamma is None else gamma.to(dtype).exp()

    causal = torch.tril(torch.ones(size, size, dtype=torch.bool, device=k.device))  # j <= i
    decay = None  # exp(gamma_i - gamma_j) on j <= i, 0 above the diagonal
    if gamma is not None:
        decay = (gamma[:, :, None] - gamma[:, None, :]).to(dtype).masked_fill(~causal, float("-inf")).exp()

    # UT transform for every chunk at once: T = (I + A)^-1, W = T diag(beta exp(gamma)) K, U0 = T diag(beta) V.
    k_beta = k_c * beta_c
    lower = torch.bmm(k_beta, k_c.transpose(1, 2))  # A_ij = beta_i k_i . k_j (times the decay) below the diagonal
    if decay is None:
        k_weighted = k_beta
    else:
        lower = lower * decay
        k_weighted = k_beta * gamma_exp[..., None]
    w, u0 = UTTransform.apply(lower, k_weighted, v_c * beta_c)

    state = (
        q_c.new_zeros(batch * heads, key_dim, value_dim)
        if initial_state is None
        else initial_state.to(dtype).flatten(0, 1)
    )
    if num_chunks == 1:
        # A single chunk (short inputs: teacher-forced rollouts, decoding) needs no loop, and its
        # chunk-end state only when a position asks for it: u = u0 - W S0 reads the state once.
        u = torch.baddbmm(u0, w, state, alpha=-1)
        chunk_states = state
    else:
        # Sequential part: u_n = u0_n - W_n S_n, S_{n+1} = exp(gamma_C) S_n + (exp(gamma_C - gamma) k)^T u_n.
        if gamma is None:
            k_to_end = k_c.transpose(1, 2)
            chunk_decay = None
        else:
            k_to_end = (k_c * (gamma[:, -1:] - gamma).to(dtype).exp()[..., None]).transpose(1, 2)
            chunk_decay = gamma_exp[:, -1].view(num_chunks, batch * heads, 1, 1)
        per_chunk = (num_chunks, batch * heads)
        states, u_per_chunk = ChunkRecurrence.apply(
            u0.view(*per_chunk, size, value_dim),
            w.view(*per_chunk, size, key_dim),
            k_to_end.view(*per_chunk, key_dim, size),
            chunk_decay,
            state,
        )
        chunk_states = states[:-1].view(-1, key_dim, value_dim)  # the state at every chunk start
        u = u_per_chunk.view(-1, size, value_dim)

    # Outputs for all chunks at once: inter-chunk (query x chunk-start state) + intra-chunk (masked attention).
    scores = torch.bmm(q_c, k_c.transpose(1, 2))
    scores = scores.masked_fill(~causal, 0) if decay is None else scores * decay
    q_inter = q_c if gamma_exp is None else q_c * gamma_exp[..., None]
    o = torch.baddbmm(torch.bmm(scores, u), q_inter, chunk_states)
    o = o.view(*shape, value_dim).permute(1, 0, 3, 2, 4).reshape(batch, num_chunks * size, heads, value_dim)
    o = o[:, :seq_len].to(q.dtype)

    def states_at(at: Tensor | None) -> Tensor:
        if at is None:  # every row's end: in range by construction, so no values to check on the host
            return positioned_states(torch.full((batch, 1), seq_len, dtype=torch.long, device=q.device))
        validate_delta_rule_inputs(q, k, v, beta, g, initial_state, at)
        return positioned_states(at)

    @without_autocast
    def positioned_states(at: Tensor) -> Tensor:
        at = at.to(device=k_c.device, dtype=torch.long)
        # p = T on a chunk boundary is the last chunk with r = C, so every chunk index stays in range.
        chunk = torch.clamp(at // size, max=num_chunks - 1)[..., None]  # [B, P, 1]
        offset = at - chunk[..., 0] * size  # r in 0..C
        # Every pick is indexed [B, P, H]: row m = b * H + h of a chunk, g = chunk * B * H + m overall.
        row = torch.arange(batch * heads, device=k_c.device).view(batch, 1, heads)
        group = chunk * (batch * heads) + row
        if num_chunks == 1:  # tiny tensors, made by ops that take no sparse gradient: plain indexing
            start, values = chunk_states[row], u[row]
        else:  # from ChunkRecurrence's own outputs, whose backward takes sparse gradients
            start, values = pick(states, (chunk, row)), pick(u_per_chunk, (chunk, row))
        # k_c and gamma always reach the states through the UT transform too, so their gradients
        # from the picks always meet a dense one (see refine/kernels/picks.py).
        keys = pick(k_c, (group,))
        cumulative = None if gamma is None else pick(gamma, (group,))
        return _states_at(offset, start, keys, values, cumulative, size)

    if state_fn:  # positions chosen later, from this very pass (the fused REFINE step)
        return o, states_at
    return o, None if positions is None else states_at(positions)


def invert_unit_lower(lower: Tensor) -> Tensor:
    """(I + tril(lower, -1))^-1 for a batch of square matrices, by recursive doubling of diagonal blocks.

    Each level inverts all 2x2 block-triangular systems of the level with two batched matmuls
    ([[T11, 0], [-T22 L21 T11, T22]]), as stable as forward substitution (it is its blocked form) and
    made of matmuls only, which every device batches well. On CPU with torch 2.13, a batched
    torch.linalg.solve_triangular takes the same time inside a 4K-token forward of the tiny model
    and is faster for chunks of a few tokens (13 vs 129 us for 16 blocks of 5 x 5).
    """
    size = lower.shape[-1]
    padded = 1 << max(size - 1, 0).bit_length()
    if padded != size:  # the doubling needs a power of two; padding rows/columns invert to identity
        lower = F.pad(lower, (0, padded - size, 0, padded - size))
    batch = lower.shape[:-2]
    blocks = torch.ones(*batch, padded, 1, 1, dtype=lower.dtype, device=lower.device)  # inverse diagonal blocks
    width = 1
    while width < padded:
        pairs = padded // (2 * width)
        diagonal = torch.diagonal(lower.reshape(*batch, pairs, 2 * width, pairs, 2 * width), dim1=-4, dim2=-2)
        lower_left = diagonal[..., width:, :width, :].movedim(-1, -3)  # [..., pairs, width, width]
        first, second = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        corner = -(second @ lower_left @ first)
        top = torch.cat([first, torch.zeros_like(first)], dim=-1)
        blocks = torch.cat([top, torch.cat([corner, second], dim=-1)], dim=-2)
        width *= 2
    return blocks[..., 0, :size, :size]


class UTTransform(torch.autograd.Function):
    """(W, U0) = (T K', T V') with T = (I + tril(A, -1))^-1: the WY form of every chunk at once.

    A [G, C, C], K' [G, C, K], V' [G, C, V] (one matrix per chunk).

    Backward: dK' = T^T dW, dV' = T^T dU0 and, because T K' = W and T V' = U0,
    dA = tril(-T^T (dW K'^T + dU0 V'^T) T^T, -1) = tril(-(dK' W^T + dV' U0^T), -1): four matmuls, not six.
    """

    @staticmethod
    def forward(ctx, lower, keys, values):
        inverse = invert_unit_lower(lower)
        w, u0 = inverse @ keys, inverse @ values
        ctx.save_for_backward(inverse, w, u0)
        return w, u0

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_w, grad_u0):
        inverse, w, u0 = ctx.saved_tensors
        transposed = inverse.transpose(-1, -2)
        grad_w = torch.zeros_like(w) if grad_w is None else grad_w
        grad_u0 = torch.zeros_like(u0) if grad_u0 is None else grad_u0
        grad_keys = torch.bmm(transposed, grad_w)
        grad_values = torch.bmm(transposed, grad_u0)
        grad_lower = torch.bmm(grad_keys, w.transpose(1, 2)).baddbmm_(grad_values, u0.transpose(1, 2))
        return grad_lower.tril_(-1).neg_(), grad_keys, grad_values


class ChunkRecurrence(torch.autograd.Function):
    """The loop over chunks, with a hand-written backward: two small matmuls per chunk each way.

    forward(u0 [N, M, C, V], w [N, M, C, K], k_to_end [N, M, K, C], chunk_decay [N, M, 1, 1] or None,
    state [M, K, V]) -> (states [N + 1, M, K, V]: the state at every chunk start and the final one,
    u [N, M, C, V]), with u_n = u0_n - w_n S_n and S_{n+1} = chunk_decay_n S_n + k_to_end_n u_n.
    The parameter gradients (of w, k_to_end, chunk_decay) are batched over chunks after the reverse loop.
    """

    @staticmethod
    def forward(ctx, u0, w, k_to_end, chunk_decay, state):
        num_chunks = u0.shape[0]
        states = u0.new_empty(num_chunks + 1, *state.shape)
        states[0] = state
        u = u0.clone()  # updated in place: in-place baddbmm_ spares a copy per chunk
        for n in range(num_chunks):
            u[n].baddbmm_(w[n], states[n], alpha=-1)
            if chunk_decay is None:
                torch.baddbmm(states[n], k_to_end[n], u[n], out=states[n + 1])
            else:
                torch.mul(states[n], chunk_decay[n], out=states[n + 1])
                states[n + 1].baddbmm_(k_to_end[n], u[n])
        ctx.save_for_backward(w, k_to_end, chunk_decay, states, u)
        return states, u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states, grad_u):
        w, k_to_end, chunk_decay, states, u = ctx.saved_tensors
        num_chunks = u.shape[0]
        # Both accumulators start from the outside gradients and are completed in place, chunk by chunk.
        grad_u_total = _accumulator(grad_u, u)  # of u_n, incl. via S_{n+1}
        grad_states = _accumulator(grad_states, states)  # of S_n, total
        for n in reversed(range(num_chunks)):
            grad_end = grad_states[n + 1]  # complete: every later chunk has been processed
            grad_u_total[n].baddbmm_(k_to_end[n].transpose(-1, -2), grad_end)
            grad_start = grad_states[n]
            grad_start.baddbmm_(w[n].transpose(-1, -2), grad_u_total[n], alpha=-1)
            if chunk_decay is None:
                grad_start.add_(grad_end)
            else:
                grad_start.addcmul_(grad_end, chunk_decay[n])
        needs = ctx.needs_input_grad
        grad_w = -(grad_u_total @ states[:-1].transpose(-1, -2)) if needs[1] else None
        grad_k_to_end = grad_states[1:] @ u.transpose(-1, -2) if needs[2] else None
        grad_decay = None
        if chunk_decay is not None and needs[3]:
            grad_decay = (grad_states[1:] * states[:-1]).sum((-1, -2), keepdim=True)
        return grad_u_total, grad_w, grad_k_to_end, grad_decay, grad_states[0]


def _accumulator(grad: Tensor | None, like: Tensor) -> Tensor:
    """A dense tensor of our own that starts as `grad` (zeros when None), to be completed in place.

    A sparse gradient (the states at positions pick both outputs of ChunkRecurrence) is densified into
    a fresh tensor already; a dense one is autograd's and is cloned.
    """
    if grad is None:
        return torch.zeros_like(like)
    dense = densify(grad)
    return dense if dense is not grad else grad.clone()


def _states_at(
    offset: Tensor,
    start: Tensor,
    keys: Tensor,
    values: Tensor,
    cumulative: Tensor | None,
    size: int,
) -> Tensor:
    """State after r = offset[b, j] tokens of a chunk: its start state plus the first r tokens' updates.

    offset [B, P]; start [B, P, H, K, V], keys [B, P, H, C, K], values (corrected, u) [B, P, H, C, V]
    and cumulative log-decays [B, P, H, C] (float64; None: no gate) of each position's chunk. Returns
    [B * P, H, K, V].
    """
    taken = torch.arange(size, device=keys.device) < offset[..., None]  # [B, P, C]: j < r
    taken = taken[:, :, None, :]  # broadcast over heads
    if cumulative is None:
        weight = taken.to(keys.dtype)
    else:
        with_zero = F.pad(cumulative, (1, 0))  # gamma after r tokens is with_zero[r]
        gamma_r = with_zero.gather(-1, offset[:, :, None, None].expand(-1, -1, cumulative.shape[2], 1))
        weight = (gamma_r - cumulative).to(keys.dtype).masked_fill(~taken, float("-inf")).exp()
        start = start * gamma_r.to(start.dtype).exp()[..., None]
    state = start + (keys * weight[..., None]).transpose(-1, -2) @ values
    return state.flatten(0, 1)
