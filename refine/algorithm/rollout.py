"""Rollouts: k-token continuations sampled from entropy-selected prefixes.

Two generators with one output type:
- `snapshot_rollouts` (the product's engine): one no-grad pass over the document batch gives
  entropies, final-layer hidden states and the states at the selected positions; every
  position x sample of every document then decodes as one batch of k recurrent steps.
- `reprefill_rollouts` (the paper code's pattern, kept as a baseline): every prefix is run again
  from scratch before decoding, and every prefix + rollout once more for log-probs and hidden states.
  With `padded=True` every prefix is padded to the document's width, as the paper's code lays out
  its batch: embeddings, norms, MLPs and lm_head run over the padding, while the token mixers run
  over the real tokens only, as fla's DeltaNet layer unpads its input by the attention mask before
  its projections, convolutions and kernel (fla 0.3.1, the version the paper pins, and 0.6).

Rollout ordering everywhere: rollout i = (b * c + j) * n + s for document b, position j, sample s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from refine.algorithm.sampling import check_logits_finite, logprobs_from_logits, sample_tokens, suppression_ids
from refine.algorithm.selection import select_positions, token_entropy
from refine.config import RefineConfig
from refine.models import FastWeightLM, ModelState
from refine.models.base import check_integer_tensor, check_token_ids


@dataclass
class Rollouts:
    positions: Tensor  # [B, c] prefix lengths
    tokens: Tensor  # [N, k] sampled continuation
    logprobs: Tensor  # [N, k] behaviour log-probs of `tokens`
    hidden: Tensor  # [N, k, D] final-layer hidden state with rollout token j as input
    target_tokens: Tensor  # [N, k] ground truth input_ids[b, p : p + k]
    target_hidden: Tensor  # [N, k, D] teacher-forced hidden states of the ground truth
    entropies: Tensor  # [B, c] entropy of the first rollout token's distribution
    num_samples: int
    policy_version: int = 0
    rewards: Tensor | None = None  # [N], once scored

    @property
    def num_rollouts(self) -> int:
        return self.tokens.shape[0]

    @property
    def rollout_len(self) -> int:
        return self.tokens.shape[1]

    def rows_of(self, start: int, end: int) -> slice:
        """The rollout rows of documents [start, end) of the batch (rollout i belongs to document i // (c * n))."""
        per_document = self.positions.shape[1] * self.num_samples
        return slice(start * per_document, end * per_document)

    def documents(self, start: int, end: int) -> "Rollouts":
        """The rollouts of documents [start, end) of the batch."""
        rows = self.rows_of(start, end)
        return replace(
            self, positions=self.positions[start:end], tokens=self.tokens[rows], logprobs=self.logprobs[rows],
            hidden=self.hidden[rows], target_tokens=self.target_tokens[rows], target_hidden=self.target_hidden[rows],
            entropies=self.entropies[start:end], rewards=None if self.rewards is None else self.rewards[rows],
        )

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Rollouts":
        """The same rollouts with fn applied to every tensor field (a copy, a device move)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: fn(value) for name, value in values.items() if isinstance(value, Tensor)})

    def ordinary(self) -> "Rollouts":
        """The same rollouts as ordinary tensors (see `ordinary`): what the engines hand back."""
        return self.map(Tensor.clone)


def prefix_rows(positions: Tensor) -> tuple[Tensor, Tensor]:
    """(document row, position) of every selected prefix, flattened in b * c + j order."""
    batch, chunks = positions.shape
    rows = torch.arange(batch, device=positions.device).repeat_interleave(chunks)
    return rows, positions.reshape(-1)


def gather_windows(x: Tensor, rows: Tensor, starts: Tensor, width: int) -> Tensor:
    """x [B, T, ...] -> [len(rows), width, ...] with x[rows[i], starts[i] + t]."""
    idx = starts[:, None] + torch.arange(width, device=x.device)
    return x[rows[:, None], idx]


def choose_positions(logits: Tensor, lengths: Tensor, cfg: RefineConfig,
                     generator: torch.Generator | None) -> Tensor:
    """Rollout positions [B, c] from the document pass's logits."""
    return select_positions(
        token_entropy(logits.detach()), lengths, num_chunks=cfg.num_chunks, rollout_len=cfg.rollout_len,
        strategy=cfg.selection, temperature=cfg.selection_temperature, margin=cfg.margin, generator=generator,
    )


def positions_problem(positions: Tensor, lengths: Tensor, rollout_len: int) -> str | None:
    """Why rollouts cannot start at `positions` [B, c] of documents of `lengths` [B], naming the first entry, or
    None: each needs a prefix of at least one token (its first logits) and rollout_len ground-truth tokens after
    it, 1 <= p <= length - rollout_len."""
    lengths = lengths.to(device=positions.device, dtype=torch.long)
    last = lengths[:, None] - rollout_len
    outside = (positions < 1) | (positions > last)
    if not bool(outside.any()):
        return None
    row, column = outside.nonzero()[0].tolist()
    return (f"positions[{row}, {column}]={int(positions[row, column])} is outside 1..{int(last[row, 0])} "
            f"(document length {int(lengths[row])}, rollout_len k={rollout_len})")


def check_positions(positions: Tensor, lengths: Tensor, rollout_len: int) -> None:
    """Refuse given rollout positions that a rollout cannot start at (see positions_problem)."""
    check_integer_tensor("positions", positions)
    if positions.dim() != 2 or positions.shape[0] != lengths.shape[0]:
        raise ValueError(f"positions must be [batch={lengths.shape[0]}, chunks], got shape {tuple(positions.shape)}")
    problem = positions_problem(positions, lengths, rollout_len)
    if problem is not None:
        raise ValueError(problem)


def first_token_entropy(first_logits: Tensor, positions: Tensor) -> Tensor:
    """Entropy [B, c] of each rollout's first-token distribution (a monitored quantity)."""
    return token_entropy(first_logits.detach()[:, None])[:, 0].view_as(positions).float()


def ordinary(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Copies of inference-mode tensors that autograd may use (the learner embeds rollout tokens,
    which saves them for backward); call outside inference mode."""
    return tuple(t.clone() for t in tensors)


def eos_ids(model: FastWeightLM, vocab: int) -> list[int]:
    """The model's end-of-sequence id (config.eos_token_id) as a list: empty when it names none."""
    eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    if not 0 <= int(eos) < vocab:
        raise ValueError(f"model config eos_token_id={eos} is outside the vocabulary [0, {vocab})")
    return [int(eos)]


def decode(model: FastWeightLM, states: ModelState, first_logits: Tensor, cfg: RefineConfig,
           generator: torch.Generator | None, with_hidden: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sample n continuations of k tokens from every state, all as one batch.

    states: batch P (one per prefix); first_logits [P, V]: the prediction after each prefix.
    Returns tokens [P * n, k], behaviour log-probs [P * n, k], hidden [P * n, k, D]. With
    with_hidden=False the last token is not fed back (k - 1 model steps, as a generate call makes)
    and hidden is None: for callers that run the rollouts through the model again anyway.
    The model's EOS token is never sampled: the paper's code generates rollouts with min_new_tokens = k
    (the log-probs stay those of the unmasked distribution, see `refine.algorithm.sampling`).
    """
    n, k = cfg.num_samples, cfg.rollout_len
    never = suppression_ids(eos_ids(model, first_logits.shape[-1]), first_logits.shape[-1], first_logits.device)
    # Inference mode, not just no_grad: no version counters or view tracking, a sixth less overhead
    # on decoding's many small operations.
    with torch.inference_mode():
        state = states.expand(n)
        logits = first_logits.repeat_interleave(n, dim=0)
        tokens, logprobs, hidden = [], [], []
        # Whether every step's logits are finite, read once after the loop: the steps themselves never
        # wait for the device (a GPU queues the whole decode).
        finite = torch.isfinite(logits).all()
        for step in range(k):
            if step:
                finite &= torch.isfinite(logits).all()
            token, logprob = sample_tokens(logits, cfg.temperature, cfg.top_p, cfg.top_k, generator=generator,
                                           suppress_tokens=never, check_finite=False)
            tokens.append(token)
            logprobs.append(logprob)
            if step == k - 1 and not with_hidden:
                break
            # Feeding the token gives its hidden state (the reward's input) and the next prediction.
            out = model(token[:, None], state=state, output_state=step < k - 1)
            hidden.append(out.hidden_states[:, 0])
            logits, state = out.logits[:, 0], out.state
        check_logits_finite(finite)
        outputs = [torch.stack(tokens, 1), torch.stack(logprobs, 1)]
        if with_hidden:
            outputs.append(torch.stack(hidden, 1))
    # A caller that is itself in inference mode (the rollout engines) copies its whole result once.
    if not torch.is_inference_mode_enabled():
        outputs = list(ordinary(*outputs))
    return outputs[0], outputs[1], outputs[2] if with_hidden else None


def ground_truth(input_ids: Tensor, hidden: Tensor, positions: Tensor, k: int, n: int) -> tuple[Tensor, Tensor]:
    """What the rollouts from `positions` [B, c] are scored against: the document's k tokens from each position
    (input_ids[b, p : p + k]) and the document pass's final-layer `hidden` states there, each repeated for the n
    samples: [B * c * n, k] and [B * c * n, k, D]."""
    rows, starts = prefix_rows(positions)
    target_tokens = gather_windows(input_ids, rows, starts, k).repeat_interleave(n, dim=0)
    target_hidden = gather_windows(hidden, rows, starts, k).repeat_interleave(n, dim=0)
    return target_tokens, target_hidden


def batch_generator(seed: int, epoch: int, offset: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The random stream of one document batch's rollouts, from the run seed and the batch's data cursor (its
    epoch and offset): a service's workers, sampling batches in any order, and a single-process run draw the same
    rollouts for the same batch."""
    digest = hashlib.blake2b(f"rollouts:{seed}:{epoch}:{offset}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def snapshot_rollouts(model: FastWeightLM, input_ids: Tensor, lengths: Tensor, cfg: RefineConfig,
                      generator: torch.Generator | None = None, positions: Tensor | None = None) -> Rollouts:
    """One document pass, then all rollouts decoded together from the states at the chosen positions."""
    check_token_ids("input_ids", input_ids, model.config.vocab_size)
    with torch.inference_mode():
        out = model(input_ids, lengths=lengths, output_state=False, defer_states=True)
        if positions is None:
            positions = choose_positions(out.logits, lengths, cfg, generator)
        else:
            check_positions(positions, lengths, cfg.rollout_len)
        rows, starts = prefix_rows(positions)
        first_logits = out.logits[rows, starts - 1]
        tokens, logprobs, hidden = decode(model, out.states_at(positions), first_logits, cfg, generator)
        target_tokens, target_hidden = ground_truth(input_ids, out.hidden_states, positions, cfg.rollout_len,
                                                    cfg.num_samples)
        rollouts = Rollouts(positions, tokens, logprobs, hidden, target_tokens, target_hidden,
                            first_token_entropy(first_logits, positions), cfg.num_samples)
    return rollouts.ordinary()


def _padding_work(model: FastWeightLM, rows: int, padding: int, logits: bool) -> None:
    """The work a padded layout adds over `padding` pad tokens per row, outputs unused: fla's layers
    unpad their input by the attention mask before the token mixer (projections, short convolutions,
    kernel), so the padding goes through embeddings, norms, MLPs, the final norm and (for a forward
    that keeps every position's logits) lm_head only."""
    if padding == 0:
        return
    x = model.model.embeddings(torch.zeros(rows, padding, dtype=torch.long, device=model.device))
    for block in model.model.layers:
        block.attn_norm(x)  # the norm runs before the layer unpads; the mixer adds nothing to a pad
        x = x + block.mlp(block.mlp_norm(x))
    hidden = model.model.norm(x)
    if logits:
        model.lm_head(hidden)


@torch.inference_mode()  # as the snapshot engine runs, so the benchmarks compare like with like
def _reprefill(model: FastWeightLM, input_ids: Tensor, lengths: Tensor, cfg: RefineConfig, positions: Tensor,
               generator: torch.Generator | None, padded: bool, document_hidden: Tensor | None) -> Rollouts:
    tokens, logprobs, hidden, first = [], [], [], []
    rows, starts = prefix_rows(positions)
    k, n = cfg.rollout_len, cfg.num_samples
    one_each = cfg.model_copy(update={"num_samples": 1})
    width = input_ids.shape[1]
    for row, start in zip(rows.tolist(), starts.tolist()):
        # Every rollout re-prefills its own copy of the prefix, as a batch of n prompts does. Like a
        # generate call (logits_to_keep=1), the prefill computes the logits of its last token only.
        # With padded=True each forward also runs the padding's share of the paper layout's work
        # (`_padding_work`); the real tokens' results are the unpadded ones.
        prefix_ids = input_ids[row:row + 1, :start].expand(n, -1)
        prefix = model(prefix_ids, logit_positions=torch.full((n, 1), start - 1, device=input_ids.device))
        if padded:
            _padding_work(model, n, width - start, logits=False)
        first.append(prefix.logits[0, 0])
        t, _, _ = decode(model, prefix.state, prefix.logits[:, 0], one_each, generator, with_hidden=False)
        # Then, as the paper's code does, one more full forward of prefix + rollout for the old
        # log-probs and the rollout hidden states.
        sequence = torch.cat([input_ids[row:row + 1, :start].expand(n, -1), t], dim=1)
        full = model(sequence, output_state=False)
        if padded:
            _padding_work(model, n, width - start, logits=True)
        logits = full.logits[:, start - 1:start + k - 1]
        logprobs.append(logprobs_from_logits(logits, t, cfg.temperature))  # in the model dtype, at least float32
        tokens.append(t)
        hidden.append(full.hidden_states[:, start:start + k])
    if document_hidden is None:  # the ground truth's hidden states, unless the caller's pass has them
        document_hidden = model(input_ids, lengths=lengths, output_state=False).hidden_states
    target_tokens, target_hidden = ground_truth(input_ids, document_hidden, positions, cfg.rollout_len,
                                                cfg.num_samples)
    return Rollouts(positions, torch.cat(tokens), torch.cat(logprobs), torch.cat(hidden), target_tokens,
                    target_hidden, first_token_entropy(torch.stack(first), positions), cfg.num_samples)


def reprefill_rollouts(model: FastWeightLM, input_ids: Tensor, lengths: Tensor, cfg: RefineConfig,
                       positions: Tensor, generator: torch.Generator | None = None,
                       padded: bool = False, document_hidden: Tensor | None = None) -> Rollouts:
    """The paper code's pattern: run every prefix again from the start, then decode its samples.

    padded=True does the work of the paper's layout, every prefix (and prefix + rollout) padded to
    the batch's width: the token mixers over the real tokens only (fla's layers unpad by the
    attention mask), embeddings, norms, MLPs and lm_head over the full width. The real tokens run as
    in the unpadded layout and the padding's share runs separately, so the rollouts are the same.
    document_hidden: the final-layer hidden states [B, T, D] of the no-grad document pass the
    positions were chosen from; given, the ground truth's hidden states come from it (the paper
    takes entropies and hidden states from one pass) instead of one more document forward.
    """
    check_token_ids("input_ids", input_ids, model.config.vocab_size)
    check_positions(positions, lengths, cfg.rollout_len)
    return _reprefill(model, input_ids, lengths, cfg, positions, generator, padded, document_hidden).ordinary()
