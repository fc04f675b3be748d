"""Realistic delta-rule inputs: l2-normalized q and k, beta = sigmoid(.), g = -softplus(.)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def delta_rule_inputs(
    batch: int = 2,
    seq_len: int = 65,
    heads: int = 2,
    key_dim: int = 8,
    value_dim: int = 6,
    *,
    gated: bool = False,
    with_initial_state: bool = True,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = dict(
        q=F.normalize(randn(batch, seq_len, heads, key_dim), dim=-1),
        k=F.normalize(randn(batch, seq_len, heads, key_dim), dim=-1),
        v=randn(batch, seq_len, heads, value_dim),
        beta=randn(batch, seq_len, heads).sigmoid(),
        g=-F.softplus(randn(batch, seq_len, heads) - 2.0) if gated else None,
        initial_state=randn(batch, heads, key_dim, value_dim) if with_initial_state else None,
    )
    for name, tensor in inputs.items():
        if tensor is not None:
            inputs[name] = tensor.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return inputs


def random_positions(batch: int, seq_len: int, chunk_size: int, seed: int = 0) -> torch.Tensor:
    """Per-row positions covering 0, T, chunk edges (and their neighbours) and random values, different per row."""
    gen = torch.Generator().manual_seed(seed)
    edges = [p for c in range(0, seq_len + 1, chunk_size) for p in (c - 1, c, c + 1) if 0 <= p <= seq_len]
    rows = []
    for b in range(batch):
        fixed = [0, seq_len] + edges
        random = torch.randint(0, seq_len + 1, (4,), generator=gen).tolist()
        row = fixed + random
        shift = b % len(row)
        rows.append(row[shift:] + row[:shift])  # different order (hence different values per column) per row
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture
def make_inputs():
    return delta_rule_inputs


@pytest.fixture
def make_positions():
    return random_positions
