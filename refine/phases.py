"""The three phases as library calls, all on the same one-pass machinery.

- mid-training: `refine.step.train_step` on long documents;
- post-training (`posttrain_step`): "nested", in the paper code's order: REFINE over the prompts (context
  and question, what test-time training adapts on) as `train_step` takes it on documents (one fused
  optimizer step, or rollouts sampled once and an optimizer step per mini-batch), then one optimizer step
  on SFT of the answers at the weights those steps produced;
- test-time training (`adapt_and_answer`): s REFINE steps on one unlabeled prompt, then an answer
  (greedy by default); the weights are restored afterwards unless accumulation is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from refine.algorithm.update import LossResult
from refine.config import OptimConfig, RefineConfig, RunConfig
from refine.data.batches import DocumentBatch, pad_documents
from refine.errors import check_argument_type, check_whole_number
from refine.generate import generate
from refine.models import FastWeightLM
from refine.models.base import check_token_ids
from refine.models.state import is_integer_dtype
from refine.step import StepResult, check_gradients_on, fused_step, make_optimizer, optimizer_step, train_step

MAX_SFT_COEF = torch.finfo(torch.float32).max  # the SFT loss is float32 at least: past this its product is inf


@dataclass
class QAExample:
    prompt: list[int]  # context and question: REFINE runs on these tokens
    answer: list[int]  # SFT targets


def check_no_kl_term(cfg: RefineConfig, program: str) -> None:
    """Post-training and test-time training run the fused step without a frozen reference policy (as the
    paper's code does): a KL coefficient there would be ignored without a word, so it is refused."""
    if cfg.kl_coef > 0:
        raise ValueError(f"refine.kl_coef={cfg.kl_coef}: {program} has no reference policy for a KL term; "
                         f"set refine.kl_coef=0")


def check_sft_coef(sft_coef: float, name: str = "sft_coef") -> None:
    """Refuse an SFT coefficient that is not a number from 0 to float32's largest: a negative one ascends the
    answers' loss, and past float32's largest (or NaN) the loss is not finite, so every SFT update is skipped."""
    if not (isinstance(sft_coef, numbers.Real) and math.isfinite(sft_coef) and 0 <= sft_coef <= MAX_SFT_COEF):
        raise ValueError(f"{name} must be a number from 0 to {MAX_SFT_COEF:.4g} (float32's largest: the loss "
                         f"is computed in float32 at least), got {sft_coef}")


def check_examples(examples: Sequence[QAExample], vocab_size: int, with_answers: bool) -> None:
    """Refuse, before any weight changes, examples a nested step cannot train on: none, an empty prompt, ids
    that are not the model's, or (with_answers: an SFT step follows) answers that are all empty."""
    if not examples:
        raise ValueError("examples is empty: nothing to train on")
    for index, example in enumerate(examples):
        for part in ("prompt", "answer"):
            values = getattr(example, part)
            if len(values) == 0:
                continue
            if isinstance(values, Tensor):  # `prompt + answer` would add a tensor's ids, not join them
                raise ValueError(f"examples[{index}].{part} is a tensor: QAExample holds lists of token ids "
                                 f"(give {part}.tolist())")
            tokens = torch.as_tensor(list(values))
            if not is_integer_dtype(tokens.dtype):
                raise ValueError(f"examples[{index}].{part} holds {tokens.dtype} values, not token ids: "
                                 f"{tokens[:8].tolist()}")
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"examples[{index}].{part} holds {low if low < 0 else high}, not a token id of the "
                                 f"model (vocab_size={vocab_size}: ids 0..{vocab_size - 1})")
        if len(example.prompt) == 0:
            raise ValueError(f"examples[{index}].prompt is empty: REFINE runs on the prompt")
    if with_answers and not any(len(example.answer) for example in examples):
        raise ValueError("every answer is empty: nothing to train on")


def answer_loss(logits: Tensor, input_ids: Tensor, answer_starts: Tensor, lengths: Tensor) -> Tensor:
    """Mean cross-entropy of the answer tokens input_ids[b, answer_starts[b] : lengths[b]]."""
    targets = input_ids[:, 1:]
    index = torch.arange(1, input_ids.shape[1], device=input_ids.device)[None]
    mask = (index >= answer_starts[:, None]) & (index < lengths[:, None])
    if not bool(mask.any()):
        raise ValueError("every answer is empty: nothing to train on")
    # At least float32 (bfloat16 logits), float64 kept for the float64 checks.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return (losses * mask).sum() / mask.sum()


def answer_sft_loss(model: FastWeightLM, examples: Sequence[QAExample], sft_coef: float = 1.0,
                    pad_id: int = 0) -> LossResult:
    """sft_coef * the cross-entropy of each answer given its prompt: the outer step."""
    ids, lengths = pad_documents([ex.prompt + ex.answer for ex in examples], pad_id)
    ids, lengths = ids.to(model.device), lengths.to(model.device)
    answer_starts = torch.tensor([len(ex.prompt) for ex in examples], device=model.device)
    sft = answer_loss(model(ids, lengths=lengths, output_state=False).logits, ids, answer_starts, lengths)
    zero = sft.new_zeros(())
    return LossResult(sft_coef * sft, zero, zero, {"sft_loss": float(sft.detach())})


def posttrain_step(model: FastWeightLM, optimizer: torch.optim.Optimizer, examples: Sequence[QAExample],
                   config: RunConfig, sft_coef: float = 1.0, generator: torch.Generator | None = None,
                   pad_id: int = 0) -> StepResult:
    """One nested post-training step on a batch of examples, as the paper's code runs it: REFINE over the
    prompts in `train.mode` (`refine.step.train_step` on the prompts as documents: fused, one on-policy
    optimizer step; onepass, rollouts sampled once for the batch, then an optimizer step per
    `train.mini_batches` run of prompts, as the paper's code takes `ttt_ppo_mini_batch_size` prompts per
    update), then one optimizer step on the whole batch's SFT loss computed at the weights those produced,
    each step with its own gradient clip. sft_coef = 0 leaves out the SFT step (AdamW would still move the
    weights on a zero gradient, by momentum and weight decay).

    Stats: the REFINE steps' (loss, ntp_loss, policy_loss, reward_mean, grad_norm, ...; means over the
    mini-batches), then sft_loss and the SFT step's sft_grad_norm. skipped: any step was skipped for a
    non-finite loss or gradient."""
    check_argument_type(config, RunConfig, "config")
    check_sft_coef(sft_coef)
    check_gradients_on(model, "posttrain_step")
    check_no_kl_term(config.refine, "posttrain_step")
    check_examples(examples, model.config.vocab_size, with_answers=sft_coef != 0)
    ids, lengths = pad_documents([ex.prompt for ex in examples], pad_id)
    prompts = DocumentBatch(ids.to(model.device), lengths.to(model.device), [f"example-{i}" for i in range(len(ids))])
    inner = train_step(model, optimizer, prompts, config, generator)
    if sft_coef == 0:
        return inner
    grad_clip = config.optim.grad_clip
    outer = optimizer_step(model, optimizer, answer_sft_loss(model, examples, sft_coef, pad_id), grad_clip)
    stats = inner.stats | {f"sft_{key}" if key != "sft_loss" else key: value for key, value in outer.stats.items()}
    return StepResult(stats, inner.skipped or outer.skipped)


@torch.no_grad()
def snapshot_weights(model: FastWeightLM) -> dict[str, Tensor]:
    """A copy of the model's state dict, to load back after adapting its weights."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def adapt_and_answer(model: FastWeightLM, prompt: list[int], cfg: RefineConfig, optim: OptimConfig, steps: int,
                     max_new_tokens: int, eos_id: int | None = None, restore: bool = True,
                     generator: torch.Generator | None = None, optimizer: torch.optim.Optimizer | None = None,
                     vocab_limit: int | None = None, temperature: float = 0.0,
                     top_k: int = 0) -> tuple[list[int], list[dict[str, float]]]:
    """Adapt on the prompt with `steps` REFINE updates, answer (greedily at temperature 0, else sampled with
    `generator`, among the `top_k` most likely tokens when > 0), then restore the weights.

    Accumulating over prompts: restore=False keeps the adapted weights, and passing the same `optimizer`
    to every call keeps its state (AdamW moments, step count) too; without one a fresh optimizer is made.
    `vocab_limit`: answer with ids below it only (see `generate`). The weights' .grad are as they were after it
    (restore=True)."""
    if restore and optimizer is not None:
        raise ValueError("adapt_and_answer: an optimizer is passed to carry adaptation over prompts (restore=False); "
                         "restored weights would not match its state")
    check_whole_number(steps, "steps", minimum=0)
    check_argument_type(cfg, RefineConfig, "cfg")
    check_no_kl_term(cfg, "adapt_and_answer")
    if isinstance(prompt, Tensor):  # `not prompt` is ambiguous for a tensor: one way, as QAExample's
        raise ValueError("prompt is a tensor: adapt_and_answer takes a list of token ids (give prompt.tolist())")
    if not prompt:
        raise ValueError("prompt is empty: test-time training adapts on the prompt's tokens")
    if steps > 0:
        check_gradients_on(model, "adapt_and_answer: test-time training")
    ids = torch.tensor([prompt], device=model.device)
    check_token_ids("prompt", ids, model.config.vocab_size)
    saved = snapshot_weights(model) if restore else None
    # Each step sets .grad to None before its backward: the caller's gradient tensors stay untouched.
    saved_grads = [(parameter, parameter.grad) for parameter in model.parameters()] if restore else None
    optimizer = optimizer if optimizer is not None else make_optimizer(model, optim)
    lengths = torch.tensor([len(prompt)], device=model.device)
    history = []
    try:
        for _ in range(steps):
            history.append(fused_step(model, optimizer, ids, lengths, cfg, optim.grad_clip, generator).stats)
        answer = generate(model, ids, max_new_tokens, eos_id=eos_id, temperature=temperature, top_k=top_k,
                          generator=generator, vocab_limit=vocab_limit)[0]
    finally:
        if saved is not None:
            model.load_state_dict(saved)
            for parameter, grad in saved_grads:  # the adaptation's gradients go (a model-sized copy of no use)
                parameter.grad = grad
    return answer, history
