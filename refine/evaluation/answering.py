"""Answering task examples, the library call behind `refine eval`: `evaluate(model, tokenizer, examples, task, ttt,
run_config, ttt_steps, max_new_tokens, batch_size=8, ttt_accumulate=False, ttt_batch=None)` answers every example,
greedily or sampled, in batches of prompts or after test-time REFINE (per prompt, carried across prompts, or per
batch of prompts as the paper's released scripts schedule it), and scores the answers (refine.evaluation.task_scoring).

The checks of its settings (`check_ttt_steps`, `check_ttt_batch`, `check_seed`, `check_answer_budget`,
`check_tokenizer_fits`) are the ones the command runs on its flags before the model loads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from refine.algorithm.rewards import check_run_reward
from refine.algorithm.selection import min_document_length
from refine.config import RefineConfig, RunConfig
from refine.data.batches import DocumentBatch, pad_documents
from refine.data.tasks import DEFAULT_MAX_NEW_TOKENS, MAX_GEN_TOKENS, TaskExample
from refine.errors import check_whole_number
from refine.evaluation.metrics import LongBenchScoring, task_metric
from refine.evaluation.task_scoring import answer_text, example_name, metric_task_for, score_examples
from refine.generate import generate
from refine.loop import finite_stats
from refine.models import FastWeightLM
from refine.models.config import ModelConfigBase
from refine.phases import adapt_and_answer, check_no_kl_term, snapshot_weights
from refine.runtime import note, progress_bar
from refine.step import make_optimizer, mini_batch_bounds, train_step
from refine.tokenizer import Tokenizer, check_eos_matches, check_vocab_fits

# The most --ttt-steps: each step samples rollouts over the whole prompt and updates the weights, for every
# example. The paper's released scripts take 1 or 2; a slip such as 10**11 would keep one prompt going for ever.
MAX_TTT_STEPS = 1_000
# The --seed range: train.seed's lower bound (torch seeds with 64 bits, from -2**63), but at most 2**63 - 1, well
# under torch's 2**64 - 1: test-time training seeds example (or --ttt-batch batch) i with --seed + i.
SEED_RANGE = (-2**63, 2**63 - 1)
# The paper's test-time settings, used wherever the run config does not set the field itself.
TEST_TIME_DEFAULTS: dict[str, Any] = {"reward": "binary", "lambda_nsp": 0.4}


# ---------------------------------------------------------------- test-time settings


def ttt_refine_config(cfg: RefineConfig) -> RefineConfig:
    """The paper's test-time defaults (binary reward, lambda_nsp 0.4) for every field the config left unset."""
    updates = {name: value for name, value in TEST_TIME_DEFAULTS.items() if name not in cfg.model_fields_set}
    return cfg.model_copy(update=updates)


def fit_refine_config(cfg: RefineConfig, length: int) -> tuple[RefineConfig | None, str | None]:
    """Shrink margin and chunk count so a prompt of `length` tokens can host the rollouts.

    Returns (config to use or None when no rollout fits, a note when anything changed)."""
    needed = min_document_length(cfg.num_chunks, cfg.rollout_len, cfg.margin)
    if length >= needed:
        return cfg, None
    wanted = f"refine.num_chunks={cfg.num_chunks}, rollout_len={cfg.rollout_len}, margin={cfg.margin} need {needed}"
    if length < cfg.rollout_len + 1:
        return None, f"prompt of {length} tokens is too short for a rollout ({wanted}): answered without adaptation"
    margin = cfg.margin
    while margin > 0 and margin + max(margin, cfg.rollout_len) > length:
        margin -= 1
    fitted = cfg.model_copy(update={"margin": margin, "num_chunks": min(cfg.num_chunks, length)})
    change = (f"prompt of {length} tokens is shorter than {wanted}: using num_chunks={fitted.num_chunks}, "
              f"margin={fitted.margin} for it")
    return fitted, change


# ---------------------------------------------------------------- prompts and answers


def prompt_tokens(tokenizer: Tokenizer, prompt: str, max_tokens: int | None) -> tuple[list[int], int]:
    """BOS (as training adds it) + the prompt's tokens, cut in the middle to `max_tokens` when longer, so both
    the instruction at the start and the question at the end survive (LongBench's rule).
    Returns (tokens, untruncated length)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = bos + tokenizer.encode(prompt)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, len(ids)
    head = max_tokens // 2
    return ids[:head] + ids[len(ids) - (max_tokens - head):], len(ids)


# ---------------------------------------------------------------- evaluation


def evaluate(
    model: FastWeightLM,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    task: str,
    ttt: bool = False,
    run_config: RunConfig | None = None,
    ttt_steps: int = 2,
    max_new_tokens: int | None = None,
    *,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 8,
    ttt_accumulate: bool = False,
    longbench_scoring: LongBenchScoring = "longbench",
    answer_temperature: float = 0.0,
    answer_top_k: int = 0,
    ttt_batch: int | None = None,
) -> dict[str, Any]:
    """Answer every example (after `ttt_steps` REFINE steps on its prompt when `ttt`, weights restored after
    each) and score the answers. Returns {"summary": {...}, "examples": [records]}. Answers are greedy, or
    sampled at `answer_temperature` > 0 (among the `answer_top_k` most likely tokens when > 0), seeded by
    `seed`: a prompt's draw then depends on the prompts answered with it (`batch_size`).
    `ttt_batch`: test-time training on that many prompts at a time instead, the paper's released schedule
    (see `_ttt_in_batches`; `ttt_steps` and `ttt_accumulate` do not apply).
    Without `ttt`, prompts are answered `batch_size` at a time (each answer is the one it gets alone).
    `ttt_accumulate`: adaptation carries over from example to example, in order: the weights and one
    optimizer's state are kept between examples; the model's own weights are put back at the end.

    `task` is a CLI task name (niah, mqar, ruler-qa, longbench) or a metric task name (e.g. hotpotqa).
    `max_new_tokens` None: each example's own budget (see refine.data.tasks), else 32. `longbench_scoring`:
    LongBench's own rules, or "refine-release" (the paper's, to compare with its tables)."""
    if isinstance(tokenizer, (str, Path)):
        raise ValueError(f"tokenizer must be a tokenizer, got the path {str(tokenizer)!r}: load it with "
                         f"refine.tokenizer.load_tokenizer")
    if isinstance(examples, TaskExample) or not all(isinstance(example, TaskExample) for example in examples):
        raise ValueError(f"examples must be a sequence of TaskExample, got {type(examples).__name__}")
    if not examples:
        raise ValueError("no examples to evaluate")
    if ttt:
        check_ttt_steps(ttt_steps, "ttt_steps")
    if ttt_accumulate and not ttt:
        raise ValueError("ttt_accumulate=True needs ttt=True: it carries test-time adaptation across examples")
    run_config = run_config or RunConfig()
    check_ttt_batch(ttt_batch, ttt, ttt_accumulate, run_config.train.mini_batches, "ttt_batch")
    check_answer_budget(max_new_tokens, "max_new_tokens")
    check_seed(seed, "seed")
    check_whole_number(batch_size, "batch_size")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_tokenizer_fits(model.config, tokenizer)
    refine_cfg = ttt_refine_config(run_config.refine)
    if ttt:  # test-time training scores its rollouts in-process: tokens and hidden states, no text
        check_run_reward(refine_cfg.reward, refine_cfg.reward_modules, decodes_text=False)
        check_no_kl_term(refine_cfg, "test-time training")
    metric_tasks = [metric_task_for(task, example) for example in examples]
    # An unknown task, or gold answers its metric cannot score, fail before any generation.
    metrics = {name: task_metric(name, longbench_scoring=longbench_scoring) for name in sorted(set(metric_tasks))}
    for example, metric_name in zip(examples, metric_tasks):
        problem = metrics[metric_name].gold_problem(example.answers, example.all_classes)
        if problem is not None:
            raise ValueError(f"{example_name(example)}: {problem}")

    started = time.perf_counter()
    prompts: list[list[int]] = []
    budgets: list[int] = []
    records: list[dict[str, Any]] = []
    truncated = clamped = unadapted = 0
    for example, metric_name in zip(examples, metric_tasks):
        ids, full_length = prompt_tokens(tokenizer, example.prompt, max_prompt_tokens)
        record: dict[str, Any] = {"id": example.example_id, "task": metric_name, "prompt_tokens": len(ids)}
        if len(ids) < full_length:
            if not truncated:
                eval_note(f"prompt of {full_length} tokens cut in the middle to eval.max_prompt_tokens={len(ids)}")
            truncated += 1
            record["original_prompt_tokens"] = full_length
        prompts.append(ids)
        budgets.append(max_new_tokens or example.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        records.append(record)

    answers: list[list[int]] = [[] for _ in examples]
    sampling = AnswerSampling(answer_temperature, answer_top_k)
    # Closed however the answers end (a Ctrl-C too): an open bar is drawn again after the command's last words.
    with progress_bar(total=len(examples), desc=f"eval[{task}{'+ttt' if ttt else ''}]", unit="ex",
                      disable=not progress) as bar:
        if ttt and ttt_batch is not None:
            clamped, unadapted = _ttt_in_batches(model, tokenizer, prompts, budgets, records, answers, refine_cfg,
                                                 run_config, ttt_batch, seed, sampling, bar)
        elif ttt:
            # Accumulating: one optimizer for all examples; the caller's weights are put back at the end.
            optimizer = make_optimizer(model, run_config.optim) if ttt_accumulate else None
            initial = snapshot_weights(model) if ttt_accumulate else None
            try:
                for index, (ids, budget, record) in enumerate(zip(prompts, budgets, records)):
                    cfg, change = fit_refine_config(refine_cfg, len(ids))
                    if change:
                        if not (clamped or unadapted):
                            eval_note(change)
                        clamped += cfg is not None
                        unadapted += cfg is None
                    if cfg is not None:
                        generator = torch.Generator(device=model.device).manual_seed(seed + index)
                        answers[index], history = adapt_and_answer(
                            model, ids, cfg, run_config.optim, ttt_steps, budget, eos_id=tokenizer.eos_id,
                            restore=not ttt_accumulate, generator=generator, optimizer=optimizer,
                            vocab_limit=tokenizer.vocab_size, temperature=sampling.temperature, top_k=sampling.top_k,
                        )
                        record["ttt_history"] = [finite_stats(stats) for stats in history]  # JSON has no inf or nan
                        if cfg is not refine_cfg:
                            record["ttt_fitted"] = {"num_chunks": cfg.num_chunks, "margin": cfg.margin}
                    else:
                        generator = torch.Generator(device=model.device).manual_seed(seed + index)
                        answers[index] = _answer_batch(model, [ids], [budget], tokenizer, sampling, generator)[0]
                        record["ttt_history"] = []
                    bar.update(1)
            finally:
                if initial is not None:
                    model.load_state_dict(initial)
                    model.zero_grad(set_to_none=True)  # as the other modes leave it: no gradient of the last update
        else:
            generator = torch.Generator(device=model.device).manual_seed(seed)
            for batch in answer_batches([len(ids) for ids in prompts], batch_size, model.device.type == "cuda"):
                batch_answers = _answer_batch(model, [prompts[i] for i in batch], [budgets[i] for i in batch],
                                              tokenizer, sampling, generator)
                for index, tokens in zip(batch, batch_answers):
                    answers[index] = tokens
                bar.update(len(batch))

    predictions: list[str] = []
    for example, metric_name, tokens, record in zip(examples, metric_tasks, answers, records):
        prediction = answer_text(tokenizer, tokens, metric_name)
        predictions.append(prediction)
        record.update(generated_tokens=len(tokens), prediction=prediction, answers=example.answers)

    summary, scores = score_examples(task, examples, predictions, longbench_scoring)
    for record, value in zip(records, scores):
        record["score"] = value
    summary = {
        "task": task,
        "num_examples": len(examples),
        "score": summary.pop("score"),
        "ttt": ttt,
        "seconds": round(time.perf_counter() - started, 3),
        **summary,
        "truncated_prompts": truncated,
        "answer_decoding": "greedy" if sampling.temperature == 0 else
        {"temperature": sampling.temperature, "top_k": sampling.top_k, "seed": seed},
    }
    if ttt:
        summary["ttt_config"] = {
            "steps": ttt_steps, "reward": refine_cfg.reward, "lambda_nsp": refine_cfg.lambda_nsp,
            "lambda_ntp": refine_cfg.lambda_ntp, "num_chunks": refine_cfg.num_chunks,
            "rollout_len": refine_cfg.rollout_len, "margin": refine_cfg.margin, "lr": run_config.optim.lr,
            "fitted_prompts": clamped, "unadapted_prompts": unadapted, "accumulate": ttt_accumulate,
        }
        if ttt_batch is not None:
            summary["ttt_config"].update(steps=None, accumulate=True, batch=ttt_batch,
                                         mini_batches=run_config.train.mini_batches)
        skipped = skipped_updates(records)
        summary["ttt_config"]["skipped_updates"] = skipped
        if skipped:
            eval_note(f"warning: {skipped} test-time updates were skipped, their loss or gradient not finite "
                      f"(each example's ttt_history marks them skipped_nonfinite): they left the weights as they were")
    return {"summary": summary, "examples": records}


def skipped_updates(records: list[dict[str, Any]]) -> int:
    """Test-time updates skipped as not finite: each example's own, or each --ttt-batch batch's once (its examples
    share its history; its entry's skipped_nonfinite is the share of its optimizer_steps skipped)."""
    histories = {record.get("ttt_batch", index): record.get("ttt_history", [])
                 for index, record in enumerate(records)}
    return sum(round(stats.get("skipped_nonfinite", 0.0) * stats.get("optimizer_steps", 1.0))
               for history in histories.values() for stats in history)


def _ttt_in_batches(model: FastWeightLM, tokenizer: Tokenizer, prompts: list[list[int]], budgets: list[int],
                    records: list[dict[str, Any]], answers: list[list[int]], refine_cfg: RefineConfig,
                    run_config: RunConfig, batch_size: int, seed: int, sampling: "AnswerSampling",
                    bar: tqdm) -> tuple[int, int]:
    """Test-time training as the paper's released scripts schedule it: prompts `batch_size` at a time, in order;
    for each batch, rollouts sampled once (onepass), then an optimizer step on each of `train.mini_batches`
    runs of its prompts, then every prompt of the batch answered. The weights and one optimizer carry over from
    batch to batch; the model's own weights are put back at the end. Fills `answers` and each record's
    ttt_history (the batch update's stats); returns (prompts adapted with fitted settings, prompts too short
    to adapt). Settings are fitted to a batch's shortest prompt that can host rollouts."""
    optimizer = make_optimizer(model, run_config.optim)
    initial = snapshot_weights(model)
    clamped = unadapted = 0
    noted = False  # the first fitted or unadapted prompt is noted, the rest counted in the summary
    try:
        for number, start in enumerate(range(0, len(prompts), batch_size)):
            batch = list(range(start, min(start + batch_size, len(prompts))))
            generator = torch.Generator(device=model.device).manual_seed(seed + number)
            fits = {i: fit_refine_config(refine_cfg, len(prompts[i])) for i in batch}
            adapted = [i for i in batch if fits[i][0] is not None]
            notes = [fits[i][1] for i in batch if fits[i][0] is None]
            unadapted += len(notes)
            stats: list[dict[str, float]] = []
            cfg = refine_cfg
            if adapted:
                cfg, change = fit_refine_config(refine_cfg, min(len(prompts[i]) for i in adapted))
                notes += [change] if change else []
                clamped += len(adapted) if cfg is not refine_cfg else 0
                ids, lengths = pad_documents([prompts[i] for i in adapted])
                documents = DocumentBatch(ids.to(model.device), lengths.to(model.device),
                                          [str(records[i]["id"]) for i in adapted])
                config = run_config.model_copy(update={
                    "refine": cfg, "train": run_config.train.model_copy(update={"mode": "onepass"})})
                # One entry for the batch, whose skipped_nonfinite is the share of its optimizer_steps skipped.
                steps = len(mini_batch_bounds(len(adapted), config.train.mini_batches))
                stats = [finite_stats(train_step(model, optimizer, documents, config, generator).stats)
                         | {"optimizer_steps": float(steps)}]
            if notes and not noted:
                eval_note(notes[0])
                noted = True
            for index, tokens in zip(batch, _answer_batch(model, [prompts[i] for i in batch],
                                                          [budgets[i] for i in batch], tokenizer, sampling,
                                                          generator)):
                answers[index] = tokens
                records[index]["ttt_history"] = stats if index in adapted else []
                records[index]["ttt_batch"] = number
                if index in adapted and cfg is not refine_cfg:
                    records[index]["ttt_fitted"] = {"num_chunks": cfg.num_chunks, "margin": cfg.margin}
            bar.update(len(batch))
    finally:
        model.load_state_dict(initial)
        model.zero_grad(set_to_none=True)
    return clamped, unadapted


def answer_batches(lengths: Sequence[int], batch_size: int, one_length_per_batch: bool) -> list[list[int]]:
    """Example indices grouped into batches, shortest prompts first so that a batch pads little.

    one_length_per_batch (on CUDA): a batch holds prompts of one length only, whose prefill then needs
    final states alone, which flash-linear-attention's kernels serve; prompts of different lengths
    need each row's state at its own end, which only the PyTorch chunk kernel returns."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for index in order:
        last = batches[-1] if batches else None
        if (last is None or len(last) == batch_size
                or (one_length_per_batch and lengths[last[0]] != lengths[index])):
            batches.append([index])
        else:
            last.append(index)
    return batches


@dataclass(frozen=True)
class AnswerSampling:
    """How answers are decoded: greedy at temperature 0, else sampled (top_k 0: from every token)."""

    temperature: float = 0.0
    top_k: int = 0


def _answer_batch(model: FastWeightLM, prompts: list[list[int]], budgets: list[int], tokenizer: Tokenizer,
                  sampling: AnswerSampling, generator: torch.Generator) -> list[list[int]]:
    """Answers of right-padded prompts decoded together, each cut to its own token budget. Only ids the
    tokenizer can decode are picked (a model's vocabulary may be padded past the tokenizer's)."""
    padded, lengths = pad_documents(prompts)
    answers = generate(model, padded.to(model.device), max(budgets), eos_id=tokenizer.eos_id,
                       temperature=sampling.temperature, top_k=sampling.top_k, generator=generator,
                       lengths=lengths.to(model.device), vocab_limit=tokenizer.vocab_size)
    return [tokens[:budget] for tokens, budget in zip(answers, budgets)]


def eval_note(message: str) -> None:
    """A note on stderr, as `refine eval` says it."""
    note(f"refine eval: {message}")


# ---------------------------------------------------------------- checks of the settings


def check_ttt_batch(ttt_batch: int | None, ttt: bool, ttt_accumulate: bool, mini_batches: int = 1,
                    name: str = "--ttt-batch") -> None:
    """Refuse a test-time batch that is not a positive count, that comes without --ttt or with
    --ttt-accumulate, which batches imply, or that is too small to split into train.mini_batches updates."""
    if ttt_batch is None:
        return
    check_whole_number(ttt_batch, name)
    if ttt_batch < 1:
        raise ValueError(f"{name} must be >= 1, got {ttt_batch}")
    if not ttt:
        raise ValueError(f"{name}={ttt_batch} needs --ttt: it sets how test-time training takes its prompts")
    if ttt_accumulate:
        raise ValueError(f"{name}={ttt_batch} always carries the adaptation from batch to batch: drop --ttt-accumulate")
    if ttt_batch < mini_batches:  # a batch of fewer prompts would get fewer updates than asked for
        raise ValueError(f"{name}={ttt_batch} is smaller than train.mini_batches={mini_batches}: each batch's "
                         f"prompts are split into train.mini_batches runs, one update each; give {name} >= "
                         f"{mini_batches} or lower train.mini_batches")


def check_ttt_steps(value: int, name: str = "--ttt-steps") -> None:
    """Refuse a count of REFINE updates on each prompt outside [0, MAX_TTT_STEPS] (see there)."""
    check_whole_number(value, name)
    if not 0 <= value <= MAX_TTT_STEPS:
        raise ValueError(f"{name} must be in [0, {MAX_TTT_STEPS}], got {value}: each step samples rollouts over "
                         f"the whole prompt, for every example (the paper's scripts take 1 or 2)")


def check_seed(value: int, name: str = "--seed") -> None:
    """Refuse a seed outside SEED_RANGE (see there), so that every seed the run derives from it is one torch takes."""
    check_whole_number(value, name)
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}: torch takes 64-bit seeds, and "
                         f"test-time training seeds example i with {name} + i")


def check_answer_budget(value: int | None, name: str = "--max-new-tokens") -> None:
    """Refuse a token budget for every answer outside [1, MAX_GEN_TOKENS] (refine.data.tasks says why)."""
    if value is not None:
        check_whole_number(value, name)
    if value is not None and not 1 <= value <= MAX_GEN_TOKENS:
        raise ValueError(f"{name} must be in [1, {MAX_GEN_TOKENS}] tokens, got {value}: answers are decoded one "
                         f"model step per token, and LongBench's longest budget is 512")


def check_tokenizer_fits(model_config: ModelConfigBase, tokenizer: Tokenizer, model: str = "the model") -> None:
    """Refuse a tokenizer that is not the model's: one with ids past the model's embedding, or another EOS
    (the rule `train.init_from` follows). `model` names the model in the message."""
    remedy = "give the model's own tokenizer (--tokenizer DIR)"
    check_vocab_fits(model_config.vocab_size, tokenizer, model, remedy)
    check_eos_matches(model_config.eos_token_id, tokenizer, model, remedy)
