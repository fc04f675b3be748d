"""Tensor operations of the LaCT layer, in pure PyTorch (CPU or GPU, any float dtype, autograd).

- rotary embeddings at explicit per-row positions (so they continue across carried state);
- sliding-window causal attention over a fixed-size buffer of past keys/values plus the new tokens;
- large-chunk test-time training of SwiGLU fast weights f(x) = w1 (silu(w0 x) * (w2 x)):
  every chunk of `chunk_size` tokens is first read with the current fast weights, then its keys and
  values update them (dot-product loss, per-token learning rates, optional momentum and Muon, then
  per-row renormalization to the initial weights' row norms). Muon's Newton-Schulz iterations run in
  bfloat16 as in the release, except for float64 fast weights (see `newton_schulz_dtype`).

Chunks are aligned to each sequence's absolute token count, so a row that carries a state with r
tokens of an unfinished chunk finishes that chunk after C - r more tokens. The partial chunk is kept
as the running sums of its fast-weight gradients (they are plain sums over tokens computed with the
chunk's fixed weights), which makes the state at any position exact: chunk-start weights plus the
gradient sums of the first r tokens of that chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Newton-Schulz quintic coefficients of the Muon orthogonalization (five iterations).
_NEWTON_SCHULZ_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fast weights and their updates run in at least float32 (half-precision sums drift)."""
    return torch.promote_types(dtype, torch.float32)


def l2_normalize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """x / (||x|| + eps), as the LaCT release normalizes its fast-weight queries and keys: eps is added to
    the norm, where DeltaNet's (refine.models.delta_mixers.l2_normalize, fla's) adds it under the square root."""
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def silu_backward(grad: Tensor, x: Tensor) -> Tensor:
    """d silu(x) / dx applied to `grad`, written out so autograd can differentiate through it."""
    sigma = torch.sigmoid(x)
    return grad * sigma * (1 + x * (1 - sigma))


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [B, T] (absolute token indices) -> cos, sin [B, T, 1, head_dim // 2]."""
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=angle_dtype) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = positions.to(angle_dtype)[..., None] * inv_freq
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of every head (GPT-NeoX layout, as fla's RotaryEmbedding). x [B, T, H, D]."""
    work = compute_dtype(x.dtype)
    first, second = x.to(work).chunk(2, dim=-1)
    cos, sin = cos.to(work), sin.to(work)
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)


def sliding_window_attention(
    q: Tensor, keys: Tensor, values: Tensor, num_valid_cached: Tensor, block_size: int = 256
) -> Tensor:
    """Causal attention of each query to itself and the previous (window - 1) keys.

    q [B, T, H, D]; keys/values [B, M + T, H, D]: the M = window - 1 buffered keys (right-aligned,
    the last `num_valid_cached[b]` of them real) followed by the T new ones. Returns [B, T, H, D].
    Queries are processed in blocks so memory stays O(block * (block + M)).
    """
    batch, seq_len = q.shape[:2]
    buffered = keys.shape[1] - seq_len
    first_valid = (buffered - num_valid_cached.clamp(max=buffered)).to(q.device)  # [B]
    outputs = []
    for start in range(0, seq_len, block_size):
        stop = min(seq_len, start + block_size)
        num_q, num_k = stop - start, stop - start + buffered
        query_idx = torch.arange(num_q, device=q.device)[:, None]
        key_idx = torch.arange(num_k, device=q.device)[None, :]
        in_window = (key_idx >= query_idx) & (key_idx <= query_idx + buffered)  # [num_q, num_k]
        real = (start + key_idx)[None] >= first_valid[:, None, None]  # [B, 1, num_k]
        mask = (in_window[None] & real)[:, None]  # [B, 1, num_q, num_k]
        out = F.scaled_dot_product_attention(
            q[:, start:stop].transpose(1, 2),
            keys[:, start:start + num_k].transpose(1, 2),
            values[:, start:start + num_k].transpose(1, 2),
            attn_mask=mask,
        )
        outputs.append(out.transpose(1, 2))
    if not outputs:
        return q.new_zeros(q.shape[:-1] + values.shape[-1:])
    return torch.cat(outputs, dim=1)


def newton_schulz_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of Muon's iterations for fast weights of `dtype`.

    float32 (or narrower) weights follow the LaCT release, which orthogonalizes in bfloat16 (about 2%
    away from float32 iterations: visible in the logits). The iterations scale small singular values
    up about 500-fold, so the bfloat16 rounding of the input shapes the update's near-null directions:
    float32 paths that sum a chunk's gradients in another order (token-by-token decoding vs the full
    forward) agree only up to that noise, as the release does with itself. float64 keeps full
    precision: it is our exactness check (model vs a naive recurrence, decoding vs the full forward,
    gradients), not the paper's arithmetic."""
    return torch.float64 if dtype == torch.float64 else torch.bfloat16


def newton_schulz5(g: Tensor) -> Tensor:
    """Muon: approximately orthogonalize each matrix of g [..., m, n] (five quintic iterations).

    Every step runs in `newton_schulz_dtype(g.dtype)`, as in the release: cast, transpose (tall
    matrices), divide by the Frobenius norm, iterate, transpose back. The result is returned in g's
    dtype; the release instead adds its bfloat16 result to the float32 weights, which promotes it
    to float32 exactly the same way, so the sums are identical."""
    x = g.to(newton_schulz_dtype(g.dtype))
    transpose = g.shape[-2] > g.shape[-1]
    if transpose:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in _NEWTON_SCHULZ_COEFFICIENTS:
        gram = x @ x.mT
        # `c * gram @ gram` is (c * gram) @ gram, as in the release; in bfloat16 the order shows.
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transpose:
        x = x.mT
    return x.to(g.dtype)


def renormalize_rows(w: Tensor, row_norms: Tensor) -> Tensor:
    return w / (w.norm(dim=-1, keepdim=True) + 1e-5) * row_norms


def swiglu_apply(w0: Tensor, w1: Tensor, w2: Tensor, x: Tensor) -> Tensor:
    """f(x) = w1 (silu(w0 x) * (w2 x)) for rows of x [..., n, d_in] -> [..., n, d_out]."""
    return (F.silu(x @ w0.mT) * (x @ w2.mT)) @ w1.mT


def swiglu_gradient_factors(
    w0: Tensor, w1: Tensor, w2: Tensor, k: Tensor, v: Tensor, lr0: Tensor, lr1: Tensor, lr2: Tensor
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Per-token factors (a, b) of the update of w0, w1, w2: dw = sum over tokens of a_t^T b_t.

    The update is the negative gradient of the dot-product loss -<f(k), v>, each token's term scaled
    by its learning rate. k [..., n, d_in], v [..., n, d_out], lr* [..., n, 1 or d].
    """
    gate_pre = k @ w0.mT
    up = k @ w2.mT
    gate = F.silu(gate_pre)
    hidden = gate * up
    d_hidden = v @ w1
    d_up = d_hidden * gate
    d_gate_pre = silu_backward(d_hidden * up, gate_pre)
    return (d_gate_pre, k * lr0), (v, hidden * lr1), (d_up, k * lr2)


@dataclass
class FastWeightState:
    """Fast weights of one layer, batch first, heads second: each weight [B, H, rows, cols].

    applied:  weights read by the queries of the chunk in progress;
    base:     what the next update adds to (the un-normalized sum in the pre-norm variant, else applied);
    momentum: the previous chunk's update (None without momentum);
    grad:     the gradient sums of the tokens seen so far of the chunk in progress;
    momentum_sum: the sum of those tokens' momentum coefficients [B, H] (None without momentum).
    """

    applied: tuple[Tensor, Tensor, Tensor]
    base: tuple[Tensor, Tensor, Tensor]
    momentum: tuple[Tensor, Tensor, Tensor] | None
    grad: tuple[Tensor, Tensor, Tensor]
    momentum_sum: Tensor | None


@dataclass
class ChunkRule:
    """How a finished chunk changes the fast weights."""

    chunk_size: int
    row_norms: tuple[Tensor, Tensor, Tensor]  # [H, rows, 1] norms of the initial fast weights
    use_muon: bool
    prenorm: bool

    def advance(
        self, state: FastWeightState, grads: tuple[Tensor, ...], momentum_mean: Tensor | None
    ) -> FastWeightState:
        """The fast weights after one finished chunk whose summed gradients are `grads`.

        The returned partial-chunk fields are left as they were: callers never read them from here."""
        momentum = None
        if state.momentum is not None:
            coefficient = momentum_mean[..., None, None]
            grads = tuple(g + m * coefficient for g, m in zip(grads, state.momentum))
            momentum = grads
        if self.use_muon:
            grads = tuple(newton_schulz5(g) for g in grads)
        base = tuple(b + g for b, g in zip(state.base, grads))
        applied = tuple(renormalize_rows(b, n) for b, n in zip(base, self.row_norms))
        return FastWeightState(applied, base if self.prenorm else applied, momentum, state.grad, state.momentum_sum)


def _pad_time(x: Tensor, extra: int) -> Tensor:
    """Append `extra` zero steps on dim 1 so fixed-width windows never index out of range."""
    return torch.cat([x, x.new_zeros((x.shape[0], extra) + x.shape[2:])], dim=1)


def chunked_swiglu_ttt(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lrs: tuple[Tensor, Tensor, Tensor],
    momentum: Tensor | None,
    state: FastWeightState,
    tokens_seen: Tensor,
    rule: ChunkRule,
    want_states: bool,
) -> tuple[Tensor, "FastWeightStatesAt | None"]:
    """Apply-then-update over the new tokens of every row.

    q, k [B, T, H, d_in]; v [B, T, H, d_out]; lrs [B, T, H, 1 or d]; momentum [B, T, H] or None;
    tokens_seen [B]: tokens consumed before this call (sets each row's chunk phase).
    Returns (output [B, T, H, d_out], a function of positions giving the fast-weight state after
    positions[b, j] tokens of this call, or None when want_states is False).
    """
    batch, seq_len = q.shape[:2]
    size = rule.chunk_size
    device = q.device
    offset = (tokens_seen % size).to(device)  # tokens of the unfinished chunk per row
    width = min(size, seq_len)
    # One token always falls in one chunk step (offset < size), known without reading the offsets:
    # decoding then skips a device sync per layer and token. A batch of no rows has no offsets to read.
    num_steps = 1 if seq_len == 1 or batch == 0 else int(((offset + seq_len + size - 1) // size).max())
    rows = torch.arange(batch, device=device)[:, None]
    local = torch.arange(width, device=device)
    q, k, v = (_pad_time(t, width) for t in (q, k, v))
    lrs = tuple(_pad_time(t, width) for t in lrs)
    momentum = None if momentum is None else _pad_time(momentum, width)

    def window(x: Tensor, idx: Tensor) -> Tensor:  # [B, T+w, H, ...] -> [B, H, w, ...]
        return x[rows, idx].transpose(1, 2)

    current = state
    snapshots = [state]  # fast weights at the start of each step
    starts, outputs, factor_list, momentum_terms = [], [], [], []
    last_update = None
    for step in range(num_steps):
        start = (step * size - offset).clamp(0, seq_len)
        stop = ((step + 1) * size - offset).clamp(max=seq_len)
        idx = start[:, None] + local  # [B, w]
        valid = (idx < stop[:, None]).to(q.dtype)  # tokens of this row inside this chunk
        w0, w1, w2 = current.applied
        outputs.append(swiglu_apply(w0, w1, w2, window(q, idx)).transpose(1, 2))  # [B, w, H, d_out]
        starts.append(start)
        if step == num_steps - 1 and not want_states:
            break  # the last chunk's update only matters to states, which nobody asked for
        mask = valid[:, None, :, None]
        lr0, lr1, lr2 = (window(t, idx) * mask for t in lrs)
        factors = swiglu_gradient_factors(w0, w1, w2, window(k, idx), window(v, idx), lr0, lr1, lr2)
        grads = tuple(a.mT @ b for a, b in factors)
        momentum_mean = None
        if momentum is not None:
            term = window(momentum, idx) * valid[:, None, :]  # [B, H, w]
            momentum_terms.append(term)
            momentum_sum = term.sum(-1) + (state.momentum_sum if step == 0 else 0)
            momentum_mean = momentum_sum / size
        if step == 0:
            grads = tuple(g + carried for g, carried in zip(grads, state.grad))
        factor_list.append(factors)
        if step < num_steps - 1:
            current = rule.advance(current, grads, momentum_mean)
            snapshots.append(current)
        else:
            last_update = (current, grads, momentum_mean)  # only states at the very end need it

    # Each token's output sits in the window of its chunk's step.
    token = torch.arange(seq_len, device=device)[None, :]
    token_step = (offset[:, None] + token) // size  # [B, T]
    step_starts = torch.stack(starts, dim=1)  # [B, S]
    token_local = token - step_starts.gather(1, token_step)
    output = torch.stack(outputs, dim=1)[rows, token_step, token_local]  # [B, T, H, d_out]

    if not want_states:
        return output, None
    return output, FastWeightStatesAt(
        rule, state, offset, snapshots, last_update, step_starts, local, factor_list, momentum_terms
    )


class FastWeightStatesAt:
    """The fast-weight state after any positions of one call: chunk-start weights + partial gradient sums."""

    def __init__(
        self,
        rule: ChunkRule,
        carried: FastWeightState,
        offset: Tensor,
        snapshots: list[FastWeightState],
        last_update: tuple,
        step_starts: Tensor,
        local: Tensor,
        factor_list: list,
        momentum_terms: list[Tensor],
    ):
        self.rule = rule
        self.carried = carried
        self.offset = offset
        self.snapshots = snapshots
        self.last_update = last_update
        self.step_starts = step_starts
        self.local = local
        self.num_steps = len(factor_list)
        self._factor_list = factor_list
        self._momentum_terms = momentum_terms
        self._stacked = None

    def _stacked_factors(self) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """[B, S, H, w, ...] per factor (and momentum terms [B, S, H, w]), stacked on first use."""
        if self._stacked is None:
            factors = [
                tuple(torch.stack([f[i][j] for f in self._factor_list], dim=1) for j in range(2)) for i in range(3)
            ]
            terms = torch.stack(self._momentum_terms, dim=1) if self._momentum_terms else None
            self._stacked = (factors, terms)
        return self._stacked

    def _snapshot_list(self, need_last: bool) -> list[FastWeightState]:
        if need_last and len(self.snapshots) == self.num_steps:
            # Rows whose call ends exactly on a chunk boundary: that chunk's update, computed once.
            self.snapshots = self.snapshots + [self.rule.advance(*self.last_update)]
        return self.snapshots

    def __call__(self, positions: Tensor) -> FastWeightState:
        batch, num_positions = positions.shape
        step = (self.offset[:, None] + positions) // self.rule.chunk_size  # [B, P]
        snapshots = self._snapshot_list(bool((step == self.num_steps).any()))
        rows = torch.arange(batch, device=positions.device)[:, None].expand(batch, num_positions)
        snapshot_idx = step.clamp(max=len(snapshots) - 1)

        def pick(get) -> Tensor:
            stacked = torch.stack([get(s) for s in snapshots], dim=1)  # [B, S, ...]
            return stacked[rows, snapshot_idx].flatten(0, 1)

        applied = tuple(pick(lambda s, i=i: s.applied[i]) for i in range(3))
        base = applied if not self.rule.prenorm else tuple(pick(lambda s, i=i: s.base[i]) for i in range(3))
        momentum = None
        if self.carried.momentum is not None:
            momentum = tuple(pick(lambda s, i=i: s.momentum[i]) for i in range(3))

        # Tokens of the request's own chunk that come before the requested position.
        window_step = step.clamp(max=self.num_steps - 1)
        token_idx = self.step_starts[rows, window_step][..., None] + self.local  # [B, P, w]
        before = (token_idx < positions[..., None]) & (step < self.num_steps)[..., None]
        in_first = step == 0  # the carried partial sums belong to the first step's chunk
        factors, momentum_terms = self._stacked_factors()
        grad = []
        for i, (a_all, b_all) in enumerate(factors):
            a, b = a_all[rows, window_step], b_all[rows, window_step]  # [B, P, H, w, ...]
            partial = a.mT @ (b * before[:, :, None, :, None].to(b.dtype))
            partial = partial + self.carried.grad[i][:, None] * in_first[..., None, None, None].to(b.dtype)
            grad.append(partial.flatten(0, 1))
        momentum_sum = None
        if momentum_terms is not None:
            terms = momentum_terms[rows, window_step]  # [B, P, H, w]
            partial = (terms * before[:, :, None, :].to(terms.dtype)).sum(-1)
            partial = partial + self.carried.momentum_sum[:, None] * in_first[..., None].to(terms.dtype)
            momentum_sum = partial.flatten(0, 1)
        return FastWeightState(applied, base, momentum, tuple(grad), momentum_sum)
