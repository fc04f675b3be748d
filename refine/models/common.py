"""Building blocks shared by every model: RMSNorm, SwiGLU MLP, short causal convolution.

Parameter names and shapes follow flash-linear-attention (`weight` of RMSNorm, `gate_proj` /
`up_proj` / `down_proj` of GatedMLP, `weight` of shape [D, 1, K] for ShortConvolution) so that
checkpoints move between the two without conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refine.kernels.picks import pick


def gather_positions(x: Tensor, positions: Tensor, width: int, sparse_grad: bool = False) -> Tensor:
    """x: [B, L, ...]; positions: [B, P] start indices. Returns [B * P, width, ...] windows.

    sparse_grad: pick the windows with refine.kernels.picks.pick, for an x whose maker's backward takes
    the sparse gradient that pick gives on CPU (see that module's contract).
    """
    offsets = torch.arange(width, device=x.device)
    idx = positions[..., None] + offsets  # [B, P, width]
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return (pick(x, (batch, idx)) if sparse_grad else x[batch, idx]).flatten(0, 1)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        # Low-precision inputs are normalized in float32, as fla's fused kernel does. F.rms_norm is
        # x * rsqrt(mean(x^2) + eps) * weight, one call instead of seven on decoding's tiny inputs.
        compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = F.rms_norm(compute, (compute.shape[-1],), self.weight.to(compute.dtype), self.eps)
        return out.to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * activation(gate): fla's FusedRMSNormGated, which normalizes first, then gates.

    activation: "swish" or its other name "silu" (gate * sigmoid(gate), fla's default), or "sigmoid".
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, activation: str = "swish"):
        super().__init__(hidden_size, eps)
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"activation={activation!r} is not supported; choose 'swish', 'silu' or 'sigmoid'")
        self.activation = activation

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return super().forward(x) * (gate.sigmoid() if self.activation == "sigmoid" else F.silu(gate))


def mlp_intermediate_size(hidden_size: int, hidden_ratio: int | None, intermediate_size: int | None) -> int:
    if intermediate_size is not None:
        return intermediate_size
    ratio = 4 if hidden_ratio is None else hidden_ratio
    size = int(hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)  # fla rounds up to a multiple of 256


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# On CPU the shifted multiply-adds run over blocks of about a megabyte of float32 (2^18 elements),
# so each block's rows are read from cache by all K shifts, not from memory K times: the tiny model's
# 4K-token convolution backward takes 2.1 ms instead of 3.5 (16K: 9 instead of 24), its NTP step 2-4%
# less. A GPU runs each shift once over the whole input (fewer launches). Blocks hold at least
# MIN_BLOCK_ROWS time steps, so that very wide inputs do not pay per-step call overhead instead.
CPU_BLOCK_ELEMENTS = 1 << 18
MIN_BLOCK_ROWS = 16


def rows_per_block(x: Tensor) -> int:
    """Time steps per block of x [B, T, D] for the shifted multiply-adds (see CPU_BLOCK_ELEMENTS)."""
    batch, length, dim = x.shape
    if x.device.type != "cpu":
        return max(length, 1)
    return max(MIN_BLOCK_ROWS, CPU_BLOCK_ELEMENTS // max(batch * dim, 1))


def shifted_sum(padded: Tensor, weight: Tensor) -> Tensor:
    """The forward of CausalDepthwiseConv, without autograd: y_t = sum_i w_i * padded_{t+i}."""
    kernel = weight.shape[1]
    batch, length, dim = padded.shape[0], padded.shape[1] - kernel + 1, padded.shape[2]
    # Half-precision inputs accumulate in float32 and round once, as a convolution kernel does.
    compute = torch.promote_types(padded.dtype, torch.float32)
    # Taps as contiguous rows [K, D]: broadcasting a strided column is twice as slow on CPU.
    inputs, taps = padded.to(compute), weight.to(compute).t().contiguous()
    y = inputs.new_empty(batch, length, dim)
    rows = rows_per_block(y)
    for start in range(0, length, rows):
        end = min(start + rows, length)
        block = y[:, start:end]
        torch.mul(inputs[:, start:end], taps[0], out=block)
        for i in range(1, kernel):
            block.addcmul_(inputs[:, start + i:end + i], taps[i])
    return y.to(padded.dtype)


class CausalDepthwiseConv(torch.autograd.Function):
    """y_t = sum_i w_i * padded_{t+i} (F.conv1d's cross-correlation, groups = channels) as K shifted
    multiply-adds, with a hand-written backward.

    (cache [B, K - 1, D], x [B, T, D], weight [D, K]) -> (y [B, T, D], padded = cat(cache, x) [B, K - 1 + T, D]).
    On CPU this beats a depthwise conv1d (whose backward is slow) on long inputs and its call overhead
    on the few-token inputs of decoding; the hand-written backward writes one gradient buffer instead
    of one zero-filled copy per shift. The padded inputs are an output so that the caches picked from
    them (`ShortConvolution.cache_at`) hand their gradient, sparse on CPU, to this backward, which adds
    it into that same buffer.
    """

    @staticmethod
    def forward(ctx, cache, x, weight):
        padded = torch.cat([cache, x], dim=1)
        ctx.save_for_backward(padded, weight)
        ctx.set_materialize_grads(False)  # padded often has no gradient (no caches picked): no zero fill
        return shifted_sum(padded, weight), padded

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_picked):
        padded, weight = ctx.saved_tensors
        kernel = weight.shape[1]
        compute = torch.promote_types(padded.dtype, torch.float32)
        inputs, taps = padded.to(compute), weight.to(compute).t().contiguous()
        need_cache, need_x, need_weight = ctx.needs_input_grad
        need_weight = need_weight and grad_y is not None
        grad_padded = inputs.new_zeros(inputs.shape) if need_cache or need_x else None
        grad_weight = inputs.new_zeros(kernel, inputs.shape[2]) if need_weight else None
        if grad_y is not None:
            _shifted_sum_backward(grad_y.to(compute), inputs, taps, grad_padded, grad_weight)
        if grad_padded is not None and grad_picked is not None:
            grad_padded.add_(grad_picked.to(compute))  # in place also when the picks' gradient is sparse
        if grad_padded is not None:
            grad_padded = grad_padded.to(padded.dtype)
        return (grad_padded[:, :kernel - 1] if need_cache else None, grad_padded[:, kernel - 1:] if need_x else None,
                grad_weight.t().to(weight.dtype) if need_weight else None)


def _shifted_sum_backward(grad_y: Tensor, inputs: Tensor, taps: Tensor, grad_padded: Tensor | None,
                          grad_weight: Tensor | None) -> None:
    """Adds the gradients of y = shifted_sum(inputs, taps^T) into grad_padded [B, K - 1 + T, D] and
    grad_weight [K, D] (either may be None: not wanted)."""
    kernel = taps.shape[0]
    batch, length, dim = grad_y.shape
    rows = max(1, min(rows_per_block(grad_y), length))
    # Per block: the input gradient's K shifted multiply-adds, and each tap's weight gradient as a
    # product reduced over (batch, time) by a matmul with ones (faster than sum over two axes).
    products = inputs.new_empty(batch * rows * dim) if grad_weight is not None else None
    ones = inputs.new_ones(1, batch * rows) if grad_weight is not None else None
    for start in range(0, length, rows):
        end = min(start + rows, length)
        grad_block = grad_y[:, start:end]
        for i in range(kernel):
            if grad_padded is not None:
                grad_padded[:, start + i:end + i].addcmul_(grad_block, taps[i])
            if grad_weight is not None:
                product = products[:grad_block.numel()].view(grad_block.shape)
                torch.mul(grad_block, inputs[:, start + i:end + i], out=product)
                grad_weight[i:i + 1].addmm_(ones[:, :batch * (end - start)], product.view(-1, dim))


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over time with an explicit cache.

    The cache is the last (kernel_size - 1) pre-convolution inputs, [B, K - 1, D]; with it a
    segment continues exactly where the previous one stopped.
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__()
        self.hidden_size = hidden_size
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(
        self,
        x: Tensor,
        cache: Tensor | None,
        state_positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x: [B, T, D]. Returns (y [B, T, D], padded inputs [B, K - 1 + T, D]).

        The padded inputs hold the cache for any position p (tokens consumed in this call):
        `padded[:, p : p + K - 1]`; see `cache_at`.
        """
        return short_convolutions([self], x, cache)

    def cache_at(self, padded: Tensor, positions: Tensor | None) -> Tensor:
        """Cache after `positions` [B, P] tokens of this call -> [B * P, K - 1, D]; None: after all of them."""
        width = self.kernel_size - 1
        if positions is None:  # every row's end (decoding): a slice, no look at any values
            return padded[:, padded.shape[1] - width:].clone()
        # padded comes from CausalDepthwiseConv, whose backward takes the pick's sparse gradient.
        return gather_positions(padded, positions, width, sparse_grad=True)


def short_convolutions(convs: Sequence[ShortConvolution], x: Tensor, cache: Tensor | None) -> tuple[Tensor, Tensor]:
    """ShortConvolutions of one kernel size applied as one to the channel-wise concatenation of their inputs.

    x [B, T, sum of the convs' channels], cache [B, K - 1, same] or None. Returns (y, padded inputs) as
    ShortConvolution.forward does; each conv keeps its own weight, bias and activation.
    """
    kernel = convs[0].kernel_size
    if any(conv.kernel_size != kernel for conv in convs):
        raise ValueError(f"convolutions must share one kernel size, got {[conv.kernel_size for conv in convs]}")
    if cache is None:
        cache = x.new_zeros(x.shape[0], kernel - 1, x.shape[-1])
    cache = cache.to(x.dtype)
    weight = torch.cat([conv.weight[:, 0] for conv in convs]).to(x.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (cache, x, weight)):
        y, padded = CausalDepthwiseConv.apply(cache, x, weight)
    else:  # decoding and rollout passes: no autograd node to record
        padded = torch.cat([cache, x], dim=1)
        y = shifted_sum(padded, weight)
    if any(conv.bias is not None for conv in convs):
        y = y + torch.cat([conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.hidden_size)
                           for conv in convs]).to(x.dtype)
    activations = {conv.activation for conv in convs}
    if activations == {"silu"}:
        y = F.silu(y)
    elif activations != {None}:
        pieces = y.split([conv.hidden_size for conv in convs], dim=-1)
        y = torch.cat([F.silu(piece) if conv.activation == "silu" else piece for conv, piece in zip(convs, pieces)],
                      dim=-1)
    return y, padded

