"""Token sampling for rollouts, and the one definition of a token's log-probability.

Log-probability convention (the paper's code, i.e. verl): a token's log-probability is
log_softmax(logits / temperature)[token], with no top-k / top-p / suppressed-token masking,
even though the token was drawn from the masked distribution. Behaviour log-probs returned by
`sample_tokens` and the learner's new log-probs (`logprobs_from_logits`) use the same
definition, so the PPO ratio is exactly 1 on-policy whatever the sampling filters.

Greedy decoding (temperature == 0) picks the argmax; its log-probs are taken at temperature 1
(the model's own distribution), since the degenerate greedy distribution (log 1 = 0) carries no
information for a ratio.

Filters follow Hugging Face generate's order, which the paper's code samples with: temperature,
then top-k (keep logits >= the k-th largest, so ties at the boundary are kept), then top-p on the
renormalized result (keep the smallest set of most likely tokens whose mass reaches top_p; the
most likely token is always kept). `suppress_tokens` are never emitted: the paper's code
generates with min_new_tokens = k, which forbids EOS inside a rollout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from refine.errors import NonFiniteOutputError, check_whole_number


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / temperature) at `tokens`: logits [..., V], tokens [...] -> [...].

    Differentiable; computed in at least float32. temperature == 0 means greedy and is read as 1.
    """
    _check_temperature(temperature)
    if logits.dim() < 1 or logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be tokens {tuple(tokens.shape)} plus a vocabulary axis")
    _check_token_range(tokens, logits.shape[-1])
    return _token_logprobs(logits, tokens, temperature)


def _token_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """logprobs_from_logits without its checks, for tokens in range by construction (sampled ones)."""
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature > 0:
        scaled = scaled / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def suppression_ids(suppress_tokens: Sequence[int] | Tensor | None, vocab: int,
                    device: torch.device | str) -> Tensor | None:
    """Token ids never to emit, checked against the vocabulary, as a LongTensor on `device`; None when
    there are none. A tensor is taken as already checked (decoding builds it once, not per step)."""
    if isinstance(suppress_tokens, Tensor):
        return suppress_tokens.to(device=device, dtype=torch.long) if suppress_tokens.numel() else None
    if not suppress_tokens:
        return None
    ids = [int(token) for token in suppress_tokens]
    bad = [token for token in ids if not 0 <= token < vocab]
    if bad:
        raise ValueError(f"suppress_tokens contains id {bad[0]} outside the vocabulary [0, {vocab})")
    if len(set(ids)) >= vocab:
        raise ValueError(f"suppress_tokens removes the whole vocabulary of {vocab} tokens")
    return torch.tensor(ids, dtype=torch.long, device=device)


def filter_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress_tokens: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """The logits of the distribution actually sampled from: [N, V] -> [N, V], removed tokens -inf."""
    _check_temperature(temperature)
    _check_filters(top_p, top_k)
    vocab = logits.shape[-1]
    out = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature > 0:
        out = out / temperature
    else:
        out = out.clone()
    suppressed = suppression_ids(suppress_tokens, vocab, logits.device)
    if suppressed is not None:
        out.index_fill_(-1, suppressed, float("-inf"))
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


@torch.no_grad()
def sample_tokens(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    suppress_tokens: Sequence[int] | Tensor | None = None,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row: logits [N, V] -> (tokens [N] long, logprobs [N]).

    Greedy when temperature == 0. The log-probs follow the module's convention (temperature
    scaled, unfiltered), identical to `logprobs_from_logits(logits, tokens, temperature)`.
    check_finite=False leaves the check that logits are finite, a device sync, to the caller
    (decoding checks all its steps at once with `check_logits_finite`).
    """
    if logits.dim() != 2 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [N, V], got {tuple(logits.shape)}")
    if check_finite:
        check_logits_finite(torch.isfinite(logits).all())
    filtered = filter_logits(logits, temperature, top_p, top_k, suppress_tokens)
    if temperature == 0:
        tokens = filtered.argmax(dim=-1)
    else:
        # Gumbel-max: argmax(logits + Gumbel noise) is an exact draw from softmax(logits), and on CPU
        # uniform noise is several times cheaper than torch.multinomial's exponential draws.
        tokens = gumbel_noise(filtered.shape, generator, filtered.device).add_(filtered).argmax(dim=-1)
    return tokens, _token_logprobs(logits, tokens, temperature)


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
                 device: torch.device | str) -> Tensor:
    """Standard Gumbel noise, -log(-log(U)), in float64. Not float32: its uniforms lie on a 2^-24 grid, which caps
    the noise at 16.6 and coarsens it near the cap, so Gumbel-max drew every token more than ~16 nats below the top
    one too rarely (18 nats below: 12x too rarely) or never."""
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return uniform.log_().neg_().log_().neg_()


def check_logits_finite(all_finite: Tensor) -> None:
    """Raise unless all_finite, a boolean tensor (`torch.isfinite(logits).all()`, possibly and-ed over steps)."""
    if not bool(all_finite):
        raise NonFiniteOutputError("logits must be finite (found NaN or Inf)")


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")


def _check_filters(top_p: float, top_k: int) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    check_whole_number(top_k, "top_k (0 = off)", minimum=0)


def _check_token_range(ids: Tensor, vocab: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)].flatten()[0]
        raise ValueError(f"tokens contains id {int(bad)} outside the vocabulary [0, {vocab})")
