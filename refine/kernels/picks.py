"""A few rows of a large tensor, with a gradient that touches only those rows.

The states at rollout positions are picked from tensors the size of the whole document pass (the
chunk-start states, keys and corrected values of every chunk; the short convolution's inputs). A
dense gradient of a pick is a zero-filled copy of the whole tensor, then added to the gradient of
the tensor's other uses: two passes over it per pick (with the tiny DeltaNet at 4K tokens on CPU,
2-2.5 ms of the 10-14 ms a fused step's backward adds to an NTP step's). On CPU the gradient here is
sparse instead (as nn.Embedding(sparse=True) makes it), and autograd adds its few rows into the other
uses' dense gradient: in place when the first dense gradient to reach the tensor is contiguous and not
shared, otherwise out of place (one copy; the chunk keys, whose next gradient comes through a transpose).
Other devices get the dense gradient (zero fills are cheap there).

The contract that comes with it: the picked tensor must also be used where autograd gives it a dense
gradient whenever the pick's gradient flows, so that the sparse one is only ever added to a dense
one; or the op that made the tensor must accept sparse gradients (`densify` in its backward).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pick(x: Tensor, index: tuple[Tensor, ...]) -> Tensor:
    """x[index] for d integer index tensors over x's first d axes, broadcast to one shape S: [*S, *x.shape[d:]]."""
    if x.requires_grad and torch.is_grad_enabled():
        return _Pick.apply(x, *torch.broadcast_tensors(*index))
    return x[index]


def densify(grad: Tensor | None) -> Tensor | None:
    """The gradient as a dense tensor (for a custom backward whose output may be picked)."""
    return grad.to_dense() if grad is not None and grad.is_sparse else grad


class _Pick(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *index: Tensor) -> Tensor:
        ctx.save_for_backward(*index)
        ctx.shape = x.shape
        return x[index]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        index = ctx.saved_tensors
        picked = len(index)
        values = grad.reshape(-1, *ctx.shape[picked:])
        rows = torch.stack([i.reshape(-1) for i in index])
        if grad.device.type == "cpu":
            # Rows picked twice (two positions in one chunk) are summed where the gradient is added.
            return torch.sparse_coo_tensor(rows, values, ctx.shape, check_invariants=False), *([None] * picked)
        grad_x = grad.new_zeros(ctx.shape)
        grad_x.index_put_(tuple(rows), values, accumulate=True)
        return grad_x, *([None] * picked)
