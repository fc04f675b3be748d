"""Answer generation from a prompt: one prefill pass, then recurrent decoding from the carried state."""

from __future__ import annotations

import torch
from torch import Tensor

from refine.algorithm.sampling import sample_tokens
from refine.models import FastWeightLM


@torch.no_grad()
def generate(model: FastWeightLM, prompt_ids: Tensor, max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """prompt_ids [B, T] (all rows the same length) -> new tokens per row, stopping at eos (excluded)."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty [B, T] tensor, got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    out = model(prompt_ids)
    logits, state = out.logits[:, -1], out.state
    rows = prompt_ids.shape[0]
    produced: list[list[int]] = [[] for _ in range(rows)]
    finished = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        token, _ = sample_tokens(logits, temperature, top_p, top_k, generator=generator)
        for row in range(rows):
            if not finished[row]:
                if eos_id is not None and int(token[row]) == eos_id:
                    finished[row] = True
                else:
                    produced[row].append(int(token[row]))
        if bool(finished.all()):
            break
        out = model(token[:, None], state=state)
        logits, state = out.logits[:, 0], out.state
    return produced
