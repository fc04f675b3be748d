"""The three phases as library calls, all on the same one-pass machinery.

- mid-training: `refine.loop.compute_loss` + `optimizer_step` on long documents;
- post-training (`posttrain_loss`): "nested": REFINE on the context plus SFT on the answer, from one
  forward over context + question + answer;
- test-time training (`adapt_and_answer`): s REFINE steps on one unlabeled prompt, then a greedy
  answer; the weights are restored afterwards unless accumulation is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from refine.algorithm.update import LossResult, fused_refine_step
from refine.config import OptimConfig, RefineConfig
from refine.data.batches import pad_documents
from refine.generate import generate
from refine.loop import make_optimizer, optimizer_step
from refine.models import FastWeightLM


@dataclass
class QAExample:
    context: list[int]  # REFINE runs on these tokens
    question: list[int]
    answer: list[int]  # SFT targets


def answer_loss(logits: Tensor, input_ids: Tensor, answer_starts: Tensor, lengths: Tensor) -> Tensor:
    """Mean cross-entropy of the answer tokens input_ids[b, answer_starts[b] : lengths[b]]."""
    targets = input_ids[:, 1:]
    index = torch.arange(1, input_ids.shape[1], device=input_ids.device)[None]
    mask = (index >= answer_starts[:, None]) & (index < lengths[:, None])
    if not bool(mask.any()):
        raise ValueError("every answer is empty: nothing to train on")
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")
    return (losses * mask).sum() / mask.sum()


def posttrain_loss(model: FastWeightLM, examples: Sequence[QAExample], cfg: RefineConfig, sft_coef: float = 1.0,
                   generator: torch.Generator | None = None, pad_id: int = 0) -> LossResult:
    """REFINE on each context + SFT on each answer given context and question, one forward."""
    sequences = [ex.context + ex.question + ex.answer for ex in examples]
    ids, lengths = pad_documents(sequences, pad_id)
    ids, lengths = ids.to(model.device), lengths.to(model.device)
    context_lengths = torch.tensor([len(ex.context) for ex in examples], device=model.device)
    answer_starts = torch.tensor([len(ex.context) + len(ex.question) for ex in examples], device=model.device)
    out = model(ids, lengths=lengths, output_state=False, defer_states=True)
    result, _ = fused_refine_step(model, ids, context_lengths, cfg, generator, output=out)
    sft = answer_loss(out.logits, ids, answer_starts, lengths)
    result.loss = result.loss + sft_coef * sft
    result.stats.update(sft_loss=float(sft.detach()), loss=float(result.loss.detach()))
    return result


@torch.no_grad()
def snapshot_weights(model: FastWeightLM) -> dict[str, Tensor]:
    """A copy of the model's state dict, to load back after adapting its weights."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def adapt_and_answer(model: FastWeightLM, prompt: list[int], cfg: RefineConfig, optim: OptimConfig, steps: int,
                     max_new_tokens: int, eos_id: int | None = None, restore: bool = True,
                     generator: torch.Generator | None = None, optimizer: torch.optim.Optimizer | None = None,
                     vocab_limit: int | None = None) -> tuple[list[int], list[dict[str, float]]]:
    """Adapt on the prompt with `steps` REFINE updates, answer greedily, then restore the weights.

    Accumulating over prompts: restore=False keeps the adapted weights, and passing the same `optimizer`
    to every call keeps its state (AdamW moments, step count) too; without one a fresh optimizer is made.
    `vocab_limit`: answer with ids below it only (see `generate`)."""
    if restore and optimizer is not None:
        raise ValueError("adapt_and_answer: an optimizer is passed to carry adaptation over prompts (restore=False); "
                         "restored weights would not match its state")
    saved = snapshot_weights(model) if restore else None
    optimizer = optimizer if optimizer is not None else make_optimizer(model, optim)
    ids = torch.tensor([prompt], device=model.device)
    lengths = torch.tensor([len(prompt)], device=model.device)
    history = []
    try:
        for _ in range(steps):
            result, _ = fused_refine_step(model, ids, lengths, cfg, generator)
            history.append(optimizer_step(model, optimizer, result, optim.grad_clip).stats)
        answer = generate(model, ids, max_new_tokens, eos_id=eos_id, vocab_limit=vocab_limit)[0]
    finally:
        if saved is not None:
            model.load_state_dict(saved)
            model.zero_grad(set_to_none=True)  # the adaptation's gradients: a model-sized copy, no longer of use
    return answer, history
