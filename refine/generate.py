"""Answer generation from a prompt: one prefill pass, then recurrent decoding from the carried state."""

from __future__ import annotations

import torch
from torch import Tensor

from refine.algorithm.sampling import check_logits_finite, sample_tokens
from refine.errors import check_whole_number
from refine.models import FastWeightLM
from refine.models.base import check_token_ids
from refine.models.state import is_integer_dtype


@torch.no_grad()
def generate(model: FastWeightLM, prompt_ids: Tensor, max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, lengths: Tensor | None = None,
             vocab_limit: int | None = None) -> list[list[int]]:
    """prompt_ids [B, T] -> new tokens per row, stopping at eos (excluded).

    Prompts of different lengths are right-padded to T with `lengths` [B] their own lengths: each row
    continues from the state after its own last token, so its answer is the one it gets alone.
    `vocab_limit`: only ids below it are ever picked, for a model whose vocabulary is padded past its
    tokenizer's (ids the tokenizer cannot decode).
    """
    check_token_ids("prompt_ids", prompt_ids, model.config.vocab_size)
    check_whole_number(max_new_tokens, "max_new_tokens", minimum=0)
    rows, width = prompt_ids.shape
    if lengths is None:
        lengths = torch.full((rows,), width, device=prompt_ids.device)
    lengths = torch.as_tensor(lengths, device=prompt_ids.device)
    if (lengths.shape != (rows,) or not is_integer_dtype(lengths.dtype)
            or bool(((lengths < 1) | (lengths > width)).any())):
        raise ValueError(f"lengths must be {rows} integers in [1, {width}], got {lengths.tolist()}")
    lengths = lengths.long()
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")
    # out.state is each row's state after its own length; only the last prompt token's logits are needed.
    out = model(prompt_ids, lengths=lengths, logit_positions=(lengths - 1)[:, None])
    logits, state = out.logits[:, 0, :vocab_limit], out.state  # dropping ids past the limit = masking them
    # Tokens stay on the device until the end: the host reads one flag per token (have all rows hit
    # eos?) and the finiteness of all logits once, instead of every row's token at every step.
    finite = torch.isfinite(logits).all()
    finished = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
    tokens: list[Tensor] = []
    for step in range(max_new_tokens):
        token, _ = sample_tokens(logits, temperature, top_p, top_k, generator=generator, check_finite=False)
        tokens.append(token)
        if eos_id is not None:
            finished |= token == eos_id
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        out = model(token[:, None], state=state)
        logits, state = out.logits[:, 0, :vocab_limit], out.state
        finite &= torch.isfinite(logits).all()
    check_logits_finite(finite)
    produced = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(rows)]
    return [row[:row.index(eos_id)] if eos_id in row else row for row in produced]
