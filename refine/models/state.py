"""Recurrent state of a fast-weight language model.

A model's whole past is its state: one dict of tensors per layer, every tensor with the batch
dimension first. That single rule is what lets a state be carried across segments, repeated per
sample, indexed by document and detached, whatever the architecture keeps inside it
(delta-rule matrices, short-convolution buffers, LaCT fast weights and window keys/values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether tensors of `dtype` hold integers: a cast of any other to long would truncate 1.5 to 1 (and read True
    as 1) without a word. The one test of indices, lengths, positions and token ids before they are used."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


@dataclass
class ModelState:
    layers: list[dict[str, Tensor]]

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            for tensor in layer.values():
                return tensor.shape[0]
        raise ValueError("ModelState has no tensors")

    def map(self, fn) -> "ModelState":
        return ModelState([{name: fn(t) for name, t in layer.items()} for layer in self.layers])

    def expand(self, n: int) -> "ModelState":
        """Repeat every sequence's state n times (sample i of sequence b lands at b * n + i)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def index(self, idx: Tensor | list[int]) -> "ModelState":
        """The states of rows `idx` (integers; a cast would read a bool mask as rows 0/1 and truncate 2.7 to 2)."""
        rows = torch.as_tensor(idx, device=self.device)
        if rows.numel() and not is_integer_dtype(rows.dtype):
            raise ValueError(f"idx must hold integer row numbers, got dtype {rows.dtype}: {rows.tolist()}")
        rows = rows.long()
        return self.map(lambda t: t.index_select(0, rows))

    def detach(self) -> "ModelState":
        return self.map(Tensor.detach)

    def to(self, *args, **kwargs) -> "ModelState":
        """Tensor.to on every floating tensor. Integer counters (LaCT's tokens_seen) keep their dtype and
        follow only a device the arguments name: `.to(torch.float64)` leaves them where the state is."""
        # Tensor.to parses the arguments; a probe that starts on the state's device keeps that device
        # when the arguments give none (a probe made on the CPU sent the counters to the CPU).
        device = torch.empty(0, device=self.device).to(*args, **kwargs).device
        return self.map(lambda t: t.to(*args, **kwargs) if t.is_floating_point() else t.to(device))

    @property
    def device(self) -> torch.device:
        for layer in self.layers:
            for tensor in layer.values():
                return tensor.device
        return torch.device("cpu")

    @staticmethod
    def cat(states: list["ModelState"]) -> "ModelState":
        first = states[0]
        return ModelState([
            {name: torch.cat([s.layers[i][name] for s in states], dim=0) for name in layer}
            for i, layer in enumerate(first.layers)
        ])

    def num_elements_per_sequence(self) -> int:
        return sum(t[0].numel() for layer in self.layers for t in layer.values())

    def num_bytes_per_sequence(self) -> int:
        # Each tensor's own element size: a bf16 model keeps float32 recurrent states, LaCT int64 counts.
        return sum(t[0].numel() * t.element_size() for layer in self.layers for t in layer.values())
