"""The learning-rate schedule, and AdamW with float32 master weights for bfloat16 or float16 models.

A bfloat16 weight of magnitude 0.02 moves in steps of about 1e-4, so an AdamW update of lr = 1e-6 (the
paper's) rounds back to the same value and the model does not train. As in mixed-precision training (the
paper's FSDP runs keep float32 parameters), the optimizer holds float32 copies of the weights and its
moments, steps them with the gradients cast to float32, and writes the rounded result into the model.
The model keeps computing in its own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from refine.config import OptimConfig

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over float32 masters of `params`; `step` writes the masters back into `params`.

    Its state dict is AdamW's plus the masters ("master_weights"), so a resumed run continues exactly."""

    def __init__(self, params: Iterable[torch.nn.Parameter], **adamw_options: Any) -> None:
        self.model_params = [param for param in params if param.requires_grad]
        masters = [param.detach().to(torch.float32).clone().requires_grad_(True) for param in self.model_params]
        super().__init__(masters, **adamw_options)
        self.masters = masters

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        for param, master in zip(self.model_params, self.masters):
            master.grad = None if param.grad is None else param.grad.to(torch.float32)
        super().step()
        for param, master in zip(self.model_params, self.masters):
            param.copy_(master)
            master.grad = None  # a float32 copy of every gradient, not needed until the next step

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["master_weights"] = [master.detach().clone() for master in self.masters]
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        masters = state.pop("master_weights", None)
        super().load_state_dict(state)
        if masters is None:  # saved by a plain AdamW (a full-precision run): start from the model's weights
            masters = [param.detach() for param in self.model_params]
        if len(masters) != len(self.masters):
            raise ValueError(f"optimizer state has {len(masters)} master weights, the model {len(self.masters)}")
        for master, saved in zip(self.masters, masters):
            master.copy_(saved)


@torch.no_grad()
def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with the norm taken in float32 at least: in a bfloat16 model's own dtype the
    logged norm keeps 3 significant digits and the clip factor is off by as much. Returns the total norm before
    clipping (inf or NaN for a non-finite gradient, which is then left as it is)."""
    grads = [param.grad for param in parameters if param.grad is not None]
    if not grads:
        return torch.zeros(())
    dtype = torch.float32
    for grad in grads:
        dtype = torch.promote_types(dtype, grad.dtype)  # float64 stays float64
    norms = [torch.linalg.vector_norm(grad, dtype=dtype) for grad in grads]
    total = torch.linalg.vector_norm(torch.stack([norm.to(norms[0].device) for norm in norms]))
    if torch.isfinite(total):
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
        for grad in grads:
            grad.mul_(factor.to(grad.device))
    return total


def has_low_precision_weights(model: torch.nn.Module) -> bool:
    return any(param.dtype in LOW_PRECISION for param in model.parameters())


def learning_rate(optim: OptimConfig, step: int, steps: int) -> float:
    """The learning rate of a run's step `step` (1-based) of `steps`: a linear warm-up over optim.warmup_steps
    (step s at lr x s / warmup_steps, so the first step already trains), then optim.lr (constant), or a half
    cosine from optim.lr at the first step after the warm-up towards lr x min_lr_ratio, which it would reach one
    step after `steps` (as verl's cosine does: the last step still trains, also with min_lr_ratio 0). A function
    of the step alone: a resumed run trains at the rates of the run it continues, with no scheduler state."""
    if step <= optim.warmup_steps:
        return optim.lr * (step / optim.warmup_steps)  # exactly lr at the warm-up's last step
    if optim.schedule == "constant":
        return optim.lr
    progress = min((step - optim.warmup_steps - 1) / max(steps - optim.warmup_steps, 1), 1.0)
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def describe_rates(optim: OptimConfig) -> str:
    """The settings that give a run's learning rates, for messages about its steps."""
    if optim.schedule == "constant" and not optim.warmup_steps:
        return f"optim.lr={optim.lr}"
    return (f"optim.lr={optim.lr} with optim.warmup_steps={optim.warmup_steps}, optim.schedule={optim.schedule!r}"
            f"{f', optim.min_lr_ratio={optim.min_lr_ratio}' if optim.schedule == 'cosine' else ''}: each step's "
            f"rate is its lr in metrics.jsonl")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
