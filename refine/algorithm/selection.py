"""Where rollouts start: entropy smoothing and one position per chunk of each document.

Position convention, used everywhere in the project:

    a position p is the number of prefix tokens. The rollout from p continues after
    input_ids[:p] and predicts tokens p .. p+k-1, whose ground truth is input_ids[p : p+k].
    The model state at p is the state after p tokens (`state_positions` in the model contract).

Entropy convention: entropy[b, t] is the entropy of the next-token distribution computed at
token t, i.e. of the prediction of token t+1. The first rollout token of a rollout from p is
therefore scored by entropy[b, p-1]: choosing the high-entropy index t makes the rollout start
at p = t + 1, exactly as the paper's code does ("start from the next token").

Selection, per document of valid length L (matching the paper's code):
  1. entropies are smoothed by a 1-D average pool, kernel k (k+1 if k is even), stride 1,
     zero padding kernel//2, padded zeros counted in the average (torch's default
     count_include_pad=True). Entries at t >= L are zeroed first, so a right-padded row is
     smoothed exactly as the document would be alone.
  2. the chunk size is L // c; chunk j holds entropy indices [j*size, (j+1)*size); the
     L - c*size trailing indices belong to no chunk.
  3. one index t is drawn per chunk: "entropy" with probability softmax(H_smoothed / tau),
     "uniform" uniformly, "argmax"/"argmin" the first extreme of the *raw* (unsmoothed)
     entropies, as the paper's code does.
  4. p = t + 1, clamped to [max(margin, 1), L - max(margin, k)].

Deliberate differences from the paper's code (whose batches are left-padded, so its clamp at the
width minus the margin is the document's own L - margin, as here): the upper clamp is tightened to
L - k when k > margin so that k ground-truth tokens always exist; documents too short for the chunks
and margins are refused instead of producing an out-of-range prefix; `tau` generalizes the code's
fixed tau = 1. In a left-padded batch the paper's code pools over the whole row, so the first kernel // 2
smoothed values of a shorter document average in the entropies computed at its pad positions; here they
average in zeros, as for an unpadded document (where both agree exactly: checked against the code's own
`prepare_ppo_batch_for_ttt` with forced draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from refine.errors import NonFiniteOutputError, check_whole_number
from refine.models.state import is_integer_dtype

SelectionStrategy = Literal["entropy", "uniform", "argmax", "argmin"]
SELECTION_STRATEGIES: tuple[str, ...] = ("entropy", "uniform", "argmax", "argmin")
DEFAULT_MARGIN = 20


@torch.no_grad()
def token_entropy(logits: Tensor, rows_per_chunk: int = 1024) -> Tensor:
    """Natural-log entropy of softmax(logits) over the last axis: [..., V] -> [...].

    Computed in at least float32, in row chunks so a long document's [T, V] softmax is never
    materialized twice. Masked (-inf) logits contribute zero; a row with a NaN or +Inf logit gives NaN.
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary axis, got shape {tuple(logits.shape)}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
    for start in range(0, flat.shape[0], rows_per_chunk):
        log_probs = torch.log_softmax(flat[start : start + rows_per_chunk].to(dtype), dim=-1)
        # p * log p in place; a masked (-inf) logit's term is 0 * -inf = NaN, and is 0. A row with a NaN or +Inf
        # logit stays NaN, so that select_positions refuses it (a step skips it) rather than see entropy 0.
        terms = log_probs.exp().mul_(log_probs).masked_fill_(log_probs == float("-inf"), 0.0)
        out[start : start + rows_per_chunk] = -terms.sum(dim=-1)
    return out.reshape(logits.shape[:-1])


def smoothing_kernel_size(rollout_len: int) -> int:
    """The average-pool kernel for rollout length k: k if odd, k + 1 if even."""
    check_whole_number(rollout_len, "rollout_len", minimum=1)
    return rollout_len if rollout_len % 2 == 1 else rollout_len + 1


def smooth_entropy(entropy: Tensor, rollout_len: int, lengths: Tensor | None = None) -> Tensor:
    """Average-pool entropies along time: [B, T] -> [B, T] (see the module docstring).

    Entries at t >= lengths[b] are treated as zero and come back as zero.
    """
    entropy, lengths = _as_batch(entropy, lengths)
    kernel = smoothing_kernel_size(rollout_len)
    valid = _valid_mask(lengths, entropy.shape[1])
    values = torch.where(valid, entropy, torch.zeros_like(entropy))
    if kernel == 1:
        return values
    pooled = F.avg_pool1d(
        values.unsqueeze(1), kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True
    ).squeeze(1)
    return torch.where(valid, pooled, torch.zeros_like(pooled))


def min_document_length(num_chunks: int, rollout_len: int, margin: int = DEFAULT_MARGIN) -> int:
    """Shortest document that has c non-empty chunks and a non-empty clamp range."""
    check_whole_number(num_chunks, "num_chunks", minimum=1)
    check_whole_number(rollout_len, "rollout_len", minimum=1)
    check_whole_number(margin, "margin", minimum=0)
    return max(num_chunks, margin + max(margin, rollout_len), rollout_len + 1)


def select_positions(
    entropy: Tensor | Sequence[Tensor],
    lengths: Tensor | Sequence[int] | None = None,
    *,
    num_chunks: int,
    rollout_len: int,
    strategy: SelectionStrategy = "entropy",
    temperature: float = 1.0,
    margin: int = DEFAULT_MARGIN,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One rollout start per chunk of each document: LongTensor [B, num_chunks].

    `entropy` is either a right-padded [B, T] tensor (with `lengths` [B], default T for every
    row) or a list of 1-D per-document tensors (lengths taken from them). Positions follow the
    convention of the module docstring and are in increasing chunk order. Random draws use
    `generator` (which must live on the entropy's device) so a seed fixes the result.
    """
    entropy, lengths = _as_batch(entropy, lengths)
    check_whole_number(num_chunks, "num_chunks", minimum=1)
    check_whole_number(rollout_len, "rollout_len", minimum=1)
    check_whole_number(margin, "margin", minimum=0)
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"strategy must be one of {SELECTION_STRATEGIES}, got {strategy!r}")
    if strategy == "entropy" and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0 for entropy selection, got {temperature!r}")
    _check_lengths_fit(lengths, num_chunks, rollout_len, margin)

    batch, width = entropy.shape
    valid = _valid_mask(lengths, width)
    if not torch.isfinite(entropy[valid]).all():
        doc, index = (~torch.isfinite(entropy) & valid).nonzero()[0].tolist()
        value = entropy[doc, index].item()
        raise NonFiniteOutputError(f"entropy must be finite; document {doc} has {value} at index {index}")

    if strategy == "entropy":
        scores = smooth_entropy(entropy, rollout_len, lengths) / temperature
    elif strategy == "uniform":
        scores = torch.zeros_like(entropy)
    else:
        scores = entropy

    # Gather every chunk into a [B, c, max_size] block; short chunks are padded and masked.
    device = entropy.device
    chunk_size = lengths // num_chunks  # [B]
    max_size = int(chunk_size.max())
    offsets = torch.arange(max_size, device=device)
    starts = torch.arange(num_chunks, device=device)[None, :] * chunk_size[:, None]  # [B, c]
    index = starts[:, :, None] + offsets[None, None, :]  # [B, c, max_size]
    in_chunk = offsets[None, None, :] < chunk_size[:, None, None]
    index = torch.where(in_chunk, index, torch.zeros_like(index))
    chunk_scores = torch.gather(scores, 1, index.reshape(batch, -1)).reshape(index.shape)

    if strategy == "argmin":
        within = torch.where(in_chunk, chunk_scores, torch.full_like(chunk_scores, float("inf"))).argmin(-1)
    elif strategy == "argmax":
        within = torch.where(in_chunk, chunk_scores, torch.full_like(chunk_scores, float("-inf"))).argmax(-1)
    else:
        logits = torch.where(in_chunk, chunk_scores, torch.full_like(chunk_scores, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        within = torch.multinomial(probs.reshape(-1, max_size), 1, generator=generator).reshape(batch, num_chunks)

    positions = starts + within + 1
    low = torch.full_like(lengths, max(margin, 1))  # a rollout needs at least one prefix token
    high = lengths - max(margin, rollout_len)
    return torch.maximum(torch.minimum(positions, high[:, None]), low[:, None]).long()


def _as_batch(entropy: Tensor | Sequence[Tensor], lengths: Tensor | Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """Normalize inputs to a [B, T] float tensor and a LongTensor of lengths [B]."""
    if not isinstance(entropy, Tensor):
        docs = list(entropy)
        if not docs or any(not isinstance(d, Tensor) or d.dim() != 1 for d in docs):
            raise ValueError("entropy given as a sequence must hold one 1-D tensor per document")
        if lengths is not None:
            raise ValueError("lengths must be None when entropy is a list of per-document tensors")
        lengths = torch.tensor([d.shape[0] for d in docs], device=docs[0].device)
        entropy = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
    if entropy.dim() != 2:
        raise ValueError(f"entropy must have shape [B, T], got {tuple(entropy.shape)}")
    if not entropy.is_floating_point():
        raise ValueError(f"entropy must be a floating tensor, got dtype {entropy.dtype}")
    entropy = entropy.to(torch.promote_types(entropy.dtype, torch.float32))  # bf16 would blur the pool
    batch, width = entropy.shape
    if batch == 0:
        raise ValueError(f"entropy: shape {[batch, width]}, a batch needs at least one document")
    if lengths is None:
        lengths = torch.full((batch,), width, dtype=torch.long, device=entropy.device)
    lengths = torch.as_tensor(lengths, device=entropy.device)
    if lengths.shape != (batch,) or not is_integer_dtype(lengths.dtype):
        raise ValueError(
            f"lengths must be an integer tensor of shape [{batch}], got {tuple(lengths.shape)} {lengths.dtype}"
        )
    lengths = lengths.long()
    if (lengths < 0).any() or (lengths > width).any():
        bad = int(((lengths < 0) | (lengths > width)).nonzero()[0])
        raise ValueError(f"lengths[{bad}] = {int(lengths[bad])} is outside [0, {width}]")
    return entropy, lengths


def _valid_mask(lengths: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def _check_lengths_fit(lengths: Tensor, num_chunks: int, rollout_len: int, margin: int) -> None:
    need = min_document_length(num_chunks, rollout_len, margin)
    short = (lengths < need).nonzero()
    if short.numel():
        doc = int(short[0])
        raise ValueError(
            f"document {doc} has length {int(lengths[doc])}, too short for num_chunks={num_chunks}, "
            f"rollout_len={rollout_len}, margin={margin}: need at least {need} tokens"
        )
