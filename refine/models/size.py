"""A model's size from its config alone, and a check that it fits a device before anything is allocated.

Without the check, a slip such as `model.num_hidden_layers=100000` or `model.vocab_size=10**9` allocates
until the kernel's out-of-memory killer ends the process (under Ray it may take the cluster's control store
with it), minutes after the command was typed and without naming the field.
"""

from __future__ import annotations

import os

import torch

from refine.models.config import ModelConfigBase

# The fields that set a model's size, named in the refusal.
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "expand_k", "expand_v",
               "hidden_ratio", "intermediate_size", "num_v_heads", "inter_multi", "num_lact_heads", "w0_w2_low_rank")
# Bytes per parameter held while training, as multiples of the weights': the weights, their gradients and
# AdamW's two moments (activations come on top: the check is a floor, not an estimate).
TRAINING_COPIES = 4


def count_parameters(config: ModelConfigBase) -> int:
    """The number of parameters a model of `config` has, counted on the meta device (nothing is allocated).
    Every layer of a model has the same parameters, so models of one and two layers give the count for any
    depth without building its layers (a depth of a million would take minutes to build even on meta)."""
    from refine.models import _lookup  # the registry imports this module's users

    model_class, _, _ = _lookup(config.model_type)

    def count(layers: int) -> int:
        with torch.device("meta"):
            model = model_class(config.model_copy(update={"num_hidden_layers": layers}))
        return sum(parameter.numel() for parameter in model.parameters())

    one, two = count(1), count(2)
    return one + (config.num_hidden_layers - 1) * (two - one)


def device_memory_bytes(device: str | torch.device) -> int | None:
    """Total memory of `device`: a CUDA GPU's, else this machine's physical memory; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def check_model_fits(config: ModelConfigBase, dtype: torch.dtype, device: str | torch.device,
                     training: bool, config_file: str | None = None) -> None:
    """Refuse a model whose weights (and, when `training`, their gradients and AdamW's moments) in `dtype`
    exceed the total memory of `device`, naming its size fields: as the run config's `model.*` fields, or as
    those of `config_file` (a checkpoint's config.json) where the config came from one."""
    total = device_memory_bytes(device)
    if total is None:
        return
    prefix = f"{config_file}: " if config_file else ""
    fields = prefix + ", ".join(f"{'' if config_file else 'model.'}{name}={getattr(config, name)}"
                                for name in SIZE_FIELDS if getattr(config, name, None) is not None)
    try:
        parameters = count_parameters(config)
    except (RuntimeError, TypeError, OverflowError) as error:  # sizes whose tensors torch cannot even describe
        reason = (str(error).splitlines() or [type(error).__name__])[0]  # torch may append its C++ stack
        raise ValueError(f"{fields}: a model of these sizes cannot be built even without memory ({reason}): lower "
                         f"one of them") from None
    copies = TRAINING_COPIES if training else 1
    needed = parameters * torch.empty((), dtype=dtype).element_size() * copies
    if needed <= total:
        return
    held = "its weights, their gradients and AdamW's two moments" if training else "its weights"
    raise ValueError(f"{fields}: a model of {parameters:,} parameters needs at least {needed / 2**30:,.1f} GiB "
                     f"for {held} in {str(dtype).removeprefix('torch.')}, more than the {total / 2**30:,.1f} GiB "
                     f"of {str(torch.device(device))!r}: lower one of these sizes")
