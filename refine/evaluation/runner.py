"""`refine eval`: greedy (or sampled) answers on a task (optionally after test-time REFINE per prompt), scored
with the task's own benchmark metric, written to a results JSON.

Library use: `evaluate(model, tokenizer, examples, task, ttt, run_config, ttt_steps, max_new_tokens, batch_size=8,
ttt_accumulate=False, ttt_batch=None)`.

Runner options that are not run-config fields travel as `--set eval.<name>=<value>` (see `EvalOptions`),
e.g. `--set eval.max_prompt_tokens=16352` to cut longer prompts in the middle, as LongBench does, or
`--set eval.batch_size=2` to answer fewer (right-padded) prompts at a time than the default 8, or
`--set eval.answer_temperature=1 --set eval.answer_top_k=50` to sample answers as the paper's released scripts do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError, field_validator
from tqdm import tqdm

from refine.algorithm.rewards import check_run_reward
from refine.algorithm.selection import min_document_length
from refine.config import (
    DTYPES, MAX_SYNTHETIC_LENGTH, MAX_SYNTHETIC_TOKENS, ConfigError, RefineConfig, RunConfig, greedy_or_sampled,
    load_config, parse_yaml,
)
from refine.data.batches import DocumentBatch, pad_documents
from refine.data.sources import DataSourceError
from refine.data.synthetic import NiahConfig, NiahVariant, Purpose, generate_niah, mqar_for_length, stream_salt
from refine.data.tasks import (
    DEFAULT_MAX_NEW_TOKENS, MAX_GEN_TOKENS, LoadReport, TaskExample, load_longbench, load_ruler_qa,
)
from refine.evaluation.metrics import LONGBENCH_FIRST_LINE_TASKS, LongBenchScoring, longbench_task_name, task_metric
from refine.evaluation.score import score_predictions
from refine.files import check_output_is_a_file_path, check_output_spares_inputs, write_output
from refine.generate import generate
from refine.loop import check_device, finite_stats
from refine.models import FastWeightLM, load_model, load_model_config
from refine.models.config import ModelConfigBase, Strict
from refine.phases import adapt_and_answer, check_no_kl_term, snapshot_weights
from refine.runtime import note, progress_bar
from refine.step import make_optimizer, mini_batch_bounds, train_step
from refine.tokenizer import Tokenizer, check_eos_matches, check_vocab_fits, resolve_tokenizer

CLI_TASKS = ("niah", "mqar", "ruler-qa", "longbench")
DEFAULT_TTT_STEPS = 2  # --ttt-steps: the REFINE updates on each prompt
# The most --ttt-steps: each step samples rollouts over the whole prompt and updates the weights, for every
# example. The paper's released scripts take 1 or 2; a slip such as 10**11 would keep one prompt going for ever.
MAX_TTT_STEPS = 1_000
# The --seed range: train.seed's lower bound (torch seeds with 64 bits, from -2**63), but at most 2**63 - 1, well
# under torch's 2**64 - 1: test-time training seeds example (or --ttt-batch batch) i with --seed + i.
SEED_RANGE = (-2**63, 2**63 - 1)
DEFAULT_SYNTHETIC_LENGTH = 512  # --length for niah / mqar when not given
DEFAULT_SYNTHETIC_EXAMPLES = 20  # --num-examples for niah / mqar when not given; task files default to every row
# niah / mqar prompts come from the generators' evaluation streams: salted apart from the training corpus's, so
# that no --seed (the default 1234 included) reproduces the documents a run trained on, whatever its train.seed.
SYNTHETIC_PURPOSE: Purpose = "eval"
# The paper's test-time settings, used wherever the run config does not set the field itself.
TEST_TIME_DEFAULTS: dict[str, Any] = {"reward": "binary", "lambda_nsp": 0.4}


class EvalOptions(Strict):
    """Runner options given as `--set eval.<field>=<value>`."""

    max_prompt_tokens: int | None = Field(
        None, ge=2, description="cut longer prompts in the middle (start and end kept); None: never cut"
    )
    niah_variant: NiahVariant = Field("single", description="--task niah's kind of needle")
    prompt_templates: str | None = Field(None, description="LongBench dataset2prompt.json for rows without a prompt")
    batch_size: int = Field(8, ge=1, description="prompts answered together, shortest first (on CUDA only prompts "
                            "of one length; not with --ttt, which adapts the weights to each prompt); lower it "
                            "for very long prompts")
    longbench_scoring: LongBenchScoring = Field(
        "longbench", description="longbench: LongBench's own rules; refine-release: the paper's (first-line QA "
        "answers, a fixed trec class list), to compare with its tables")
    answer_temperature: float = Field(
        0.0, ge=0, description="0: greedy answers; else sampled at this temperature, seeded by --seed (the paper's "
        "released scripts sample at 1 with answer_top_k=50, Hugging Face generate's defaults)")
    answer_top_k: int = Field(0, ge=0, description="with answer_temperature > 0, sample among the k most likely "
                              "tokens; 0: all")

    @field_validator("answer_temperature")
    @classmethod
    def _greedy_or_sampled(cls, value: float) -> float:
        return greedy_or_sampled(value, "eval.answer_temperature", "answers")


# ---------------------------------------------------------------- configuration


def split_overrides(items: Sequence[str]) -> tuple[list[str], EvalOptions]:
    """Separate `eval.*` overrides (runner options) from run-config overrides."""
    run_overrides: list[str] = []
    values: dict[str, Any] = {}
    for item in items:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("eval."):
            run_overrides.append(item)
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like eval.field=value")
        values[key.removeprefix("eval.")] = parse_yaml(item.split("=", 1)[1], f"--set {key}")
    try:
        return run_overrides, EvalOptions.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(
            f"eval.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()
        )
        raise ConfigError(f"invalid eval option: {problems}; known: {sorted(EvalOptions.model_fields)}") from None


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
    note = (f"prompt of {length} tokens is shorter than {wanted}: using num_chunks={fitted.num_chunks}, "
            f"margin={fitted.margin} for it")
    return fitted, note


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


def example_name(example: TaskExample) -> str:
    """How errors name an example: its id and, for one read from a file, the file and line it came from."""
    source = example.metadata.get("source")
    return f"example {example.example_id!r}" + (f" ({source})" if isinstance(source, str) else "")


def metric_task_for(task: str, example: TaskExample) -> str:
    """The task name whose metric scores this example.

    CLI task names pick by source: niah/mqar use the example's own task; ruler-qa keeps RULER QA names
    (ruler_*qa, qa, qa_1, qa_2) and scores anything else as ruler_qa; longbench requires a LongBench dataset.
    Any other `task` is a metric task name used for every example."""
    if task in ("niah", "mqar"):
        return example.task
    if task == "ruler-qa":
        name = example.task
        ruler_name = name in ("qa", "qa_1", "qa_2") or (name.startswith("ruler_") and name.endswith("qa"))
        return name if ruler_name else "ruler_qa"
    if task == "longbench":
        if longbench_task_name(example.task) is None:
            raise ValueError(
                f"{example_name(example)}: task {example.task!r} is not a LongBench dataset; give rows a "
                f"'dataset' field (e.g. hotpotqa) or name the file after the dataset"
            )
        return example.task
    return task


def reads_first_line_only(metric_task: str) -> bool:
    """Whether the task's metric looks only at the prediction's first line (RULER QA as REFINE scores it,
    LongBench's few-shot tasks)."""
    name = metric_task.strip()
    ruler_qa = name == "ruler_qa" or (name.startswith("ruler_") and name.endswith("qa"))
    return ruler_qa or longbench_task_name(name) in LONGBENCH_FIRST_LINE_TASKS


def answer_text(tokenizer: Tokenizer, tokens: Sequence[int], metric_task: str) -> str:
    """Decode an answer (generation already stopped at EOS) and stop it at the first line break when the
    metric reads the first line only, exactly where the metric itself would cut it."""
    text = tokenizer.decode(list(tokens))
    if not reads_first_line_only(metric_task):
        return text
    if longbench_task_name(metric_task) is not None:
        text = text.lstrip("\n")  # LongBench skips leading newlines before taking the first line
    return text.split("\n")[0]


def score_examples(task: str, examples: Sequence[TaskExample], predictions: Sequence[str],
                   longbench_scoring: LongBenchScoring = "longbench") -> tuple[dict, list[float]]:
    """Score predictions with each example's benchmark metric. Returns (summary, per-example scores x 100).

    The summary's score is the benchmark's task score (mean x 100); with several tasks (a LongBench file
    mixing datasets) it is their macro average, as LongBench reports averages, and `by_task` holds each.
    When every example has a length, `score_by_length` holds LongBench-E's per-length scores (in `by_task`
    per task when there are several); when only some have one, `rows_without_length` counts the others."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if not examples:
        raise ValueError("no examples to score")
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(metric_task_for(task, example), []).append(index)
    scores = [0.0] * len(examples)
    by_task: dict[str, dict[str, Any]] = {}
    for name, indices in groups.items():
        rows = []
        for i in indices:
            row: dict[str, Any] = {"prediction": predictions[i], "answers": examples[i].answers}
            if examples[i].all_classes is not None:  # [] too: a classification task refuses it showing []
                row["all_classes"] = examples[i].all_classes
            if examples[i].length is not None:
                row["length"] = examples[i].length
            rows.append(row)
        summary, group_scores = score_predictions(name, rows, row_names=[example_name(examples[i]) for i in indices],
                                                  longbench_scoring=longbench_scoring)
        by_task[name] = summary
        for i, value in zip(indices, group_scores):
            scores[i] = 100.0 * value
    task_scores = [s["score"] for s in by_task.values()]
    result: dict[str, Any] = {
        "score": round(sum(task_scores) / len(task_scores), 2),
        "metric": sorted({s["metric"] for s in by_task.values()}),
        "empty_predictions": sum(s["empty_predictions"] for s in by_task.values()),
    }
    by_length = ("score_by_length", "rows_without_length")  # LongBench-E's buckets, or why they are missing
    if len(by_task) > 1:
        result["by_task"] = {
            name: {"score": s["score"], "num_examples": s["num_examples"]} | {k: s[k] for k in by_length if k in s}
            for name, s in by_task.items()
        }
    else:
        (only,) = by_task.values()
        result |= {k: only[k] for k in by_length if k in only}
    return result, scores


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
                _note(f"prompt of {full_length} tokens cut in the middle to eval.max_prompt_tokens={len(ids)}")
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
                    cfg, note = fit_refine_config(refine_cfg, len(ids))
                    if note:
                        if not (clamped or unadapted):
                            _note(note)
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
            _note(f"warning: {skipped} test-time updates were skipped, their loss or gradient not finite (each "
                  f"example's ttt_history marks them skipped_nonfinite): they left the weights as they were")
    return {"summary": summary, "examples": records}


def skipped_updates(records: list[dict[str, Any]]) -> int:
    """Test-time updates skipped as not finite: each example's own, or each --ttt-batch batch's once (its examples
    share its history; its entry's skipped_nonfinite is the share of its optimizer_steps skipped)."""
    histories = {record.get("ttt_batch", index): record.get("ttt_history", [])
                 for index, record in enumerate(records)}
    return sum(round(stats.get("skipped_nonfinite", 0.0) * stats.get("optimizer_steps", 1.0))
               for history in histories.values() for stats in history)


def check_ttt_batch(ttt_batch: int | None, ttt: bool, ttt_accumulate: bool, mini_batches: int = 1,
                    name: str = "--ttt-batch") -> None:
    """Refuse a test-time batch that is not a positive count, that comes without --ttt or with
    --ttt-accumulate, which batches imply, or that is too small to split into train.mini_batches updates."""
    if ttt_batch is None:
        return
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
    if not 0 <= value <= MAX_TTT_STEPS:
        raise ValueError(f"{name} must be in [0, {MAX_TTT_STEPS}], got {value}: each step samples rollouts over "
                         f"the whole prompt, for every example (the paper's scripts take 1 or 2)")


def check_seed(value: int, name: str = "--seed") -> None:
    """Refuse a seed outside SEED_RANGE (see there), so that every seed the run derives from it is one torch takes."""
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}: torch takes 64-bit seeds, and "
                         f"test-time training seeds example i with {name} + i")


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
                cfg, note = fit_refine_config(refine_cfg, min(len(prompts[i]) for i in adapted))
                notes += [note] if note else []
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
                _note(notes[0])
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


def _note(message: str) -> None:
    note(f"refine eval: {message}")


# ---------------------------------------------------------------- examples


def check_answer_budget(value: int | None, name: str = "--max-new-tokens") -> None:
    """Refuse a token budget for every answer outside [1, MAX_GEN_TOKENS] (refine.data.tasks says why)."""
    if value is not None and not 1 <= value <= MAX_GEN_TOKENS:
        raise ValueError(f"{name} must be in [1, {MAX_GEN_TOKENS}] tokens, got {value}: answers are decoded one "
                         f"model step per token, and LongBench's longest budget is 512")


def synthetic_length(task: str, length: int | None) -> int | None:
    """The prompts' length of a generated task (niah, mqar): --length, else the default. None for a task file."""
    if task not in ("niah", "mqar"):
        return None
    return DEFAULT_SYNTHETIC_LENGTH if length is None else length


def check_synthetic_length(task: str, length: int | None, num_examples: int | None = None) -> None:
    """Refuse, before any prompt is built, a niah / mqar --length past MAX_SYNTHETIC_LENGTH, or a set of more
    than MAX_SYNTHETIC_TOKENS tokens (see there; None: the default length or count), and a --length for a task
    read from a file."""
    if task not in ("niah", "mqar"):
        if length is not None:  # a file's prompts are as long as they are
            raise ValueError(f"--length {length} applies only to --task niah and mqar, which generate their "
                             f"prompts; --task {task} reads them from --data (cut long ones with "
                             f"--set eval.max_prompt_tokens=N)")
        return
    length = DEFAULT_SYNTHETIC_LENGTH if length is None else length
    if length > MAX_SYNTHETIC_LENGTH:
        raise ValueError(
            f"--length {length} is more than {MAX_SYNTHETIC_LENGTH} tokens, the longest --task {task} prompt: "
            f"RULER's longest context (128K), and each prompt is built whole and prefilled in one pass, whose "
            f"activations grow with length x eval.batch_size; for longer prompts evaluate a task file (--data)"
        )
    count = DEFAULT_SYNTHETIC_EXAMPLES if num_examples is None else num_examples
    if count * length > MAX_SYNTHETIC_TOKENS:
        raise ValueError(
            f"--num-examples {count} x --length {length} = {count * length} tokens, more than the "
            f"{MAX_SYNTHETIC_TOKENS} a --task {task} set may hold: every prompt is generated before the first is "
            f"answered; evaluate fewer examples per call (at most {MAX_SYNTHETIC_TOKENS // length} at this length)"
        )


def build_examples(args: argparse.Namespace, tokenizer: Tokenizer, options: EvalOptions,
                   skip_bad_rows: bool = False, report: LoadReport | None = None) -> list[TaskExample]:
    """The examples `refine eval` answers: generated (niah, mqar) or read from --data; `report` receives how many
    rows of a task file were read and skipped as bad."""
    if args.num_examples is not None and args.num_examples < 1:
        raise ValueError(f"--num-examples must be >= 1, got {args.num_examples}")
    check_synthetic_length(args.task, args.length, args.num_examples)
    synthetic_count = args.num_examples if args.num_examples is not None else DEFAULT_SYNTHETIC_EXAMPLES
    length = synthetic_length(args.task, args.length)
    if args.task in ("niah", "mqar") and args.data is not None:
        raise ValueError(f"--task {args.task} generates its prompts and reads no --data (got {args.data!r}); "
                         "use --length, --num-examples and --seed")
    if args.task == "niah":
        settings = f"--length {length}, eval.niah_variant={options.niah_variant!r}"
        try:
            config = NiahConfig(variant=options.niah_variant, length=length, seed=args.seed,
                                purpose=SYNTHETIC_PURPOSE)
        except ValidationError as err:
            raise ValueError(f"invalid needle-in-a-haystack settings ({settings}): {err.errors()[0]['msg']}") from None
        try:
            return generate_niah(config, tokenizer, synthetic_count)
        except ValueError as err:  # e.g. a length the variant's prompt does not fit in
            raise ValueError(f"invalid needle-in-a-haystack settings ({settings}): {err}") from None
    if args.task == "mqar":
        return mqar_for_length(length, tokenizer, synthetic_count, args.seed, purpose=SYNTHETIC_PURPOSE)
    if args.data is None:
        raise ValueError(f"--data is required for --task {args.task}: a JSON lines, parquet or save_to_disk file")
    if args.task not in TASK_COLUMNS:
        raise ValueError(f"--task must be one of {CLI_TASKS}, got {args.task!r}")
    try:
        if args.task == "ruler-qa":
            return load_ruler_qa(args.data, limit=args.num_examples, skip_bad_rows=skip_bad_rows, report=report)
        return load_longbench(args.data, limit=args.num_examples, prompt_templates=options.prompt_templates,
                              skip_bad_rows=skip_bad_rows, report=report)
    except DataSourceError as err:
        raise DataSourceError(f"{err}{_column_hint(args.data, args.task)}") from None


def synthetic_set(task: str, seed: int) -> dict[str, Any] | None:
    """For --task niah / mqar: which random streams produced the prompts (example i from
    `random.Random(f"{salt}:{seed}:{i}")`), as the results record it; None for tasks read from files."""
    if task not in ("niah", "mqar"):
        return None
    salt = stream_salt(task, SYNTHETIC_PURPOSE)
    return {"purpose": SYNTHETIC_PURPOSE, "seed": seed, "salt": salt, "streams": f"{salt}:{seed}:<index>",
            "training_salt": stream_salt(task, "train")}


# The column sets each task file may use (any one of them), as the loaders accept them.
TASK_COLUMNS = {
    "ruler-qa": [["prompt", "answer"], ["prompt", "answers"], ["input", "outputs"]],
    "longbench": [["input", "context", "answers"], ["prompt", "answers"]],
}


HINT_FIELDS = 20  # the most field names a column hint lists (a row may have thousands)


def _column_hint(path: str, task: str) -> str:
    """For a JSON lines file whose first row is an object lacking every accepted column set: the fields it does
    have. Anything else gets no hint (the loader's error already says what is wrong); the hint never fails."""
    if Path(path).suffix not in (".jsonl", ".json") or not Path(path).is_file():
        return ""
    try:
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        row = json.loads(first) if first else None
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past Python's stack
        return ""
    if not isinstance(row, dict):
        return ""
    alternatives = TASK_COLUMNS[task]
    if any(all(column in row for column in columns) for columns in alternatives):
        return ""
    fields = sorted(row)
    shown = ", ".join(f"{name!r:.60}" for name in fields[:HINT_FIELDS])
    more = f", ... ({len(fields)} in all)" if len(fields) > HINT_FIELDS else ""
    accepted = " or ".join("+".join(columns) for columns in alternatives)
    return f"; its first row has fields [{shown}{more}], --task {task} expects {accepted}"


def check_tokenizer_fits(model_config: ModelConfigBase, tokenizer: Tokenizer, model: str = "the model") -> None:
    """Refuse a tokenizer that is not the model's: one with ids past the model's embedding, or another EOS
    (the rule `train.init_from` follows). `model` names the model in the message."""
    remedy = "give the model's own tokenizer (--tokenizer DIR)"
    check_vocab_fits(model_config.vocab_size, tokenizer, model, remedy)
    check_eos_matches(model_config.eos_token_id, tokenizer, model, remedy)


def check_model_dir(model_dir: Path) -> None:
    """Refuse, before anything is written next to it, a --model that is not a model directory."""
    name = f"--model {str(model_dir)!r}"
    if not model_dir.exists():
        raise ValueError(f"{name} does not exist")
    if not model_dir.is_dir():
        raise ValueError(f"{name} is a file, not a model directory (one with config.json)")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{name} is not a model directory: it has no config.json")


def default_output(model_dir: Path, task: str, ttt: bool, ttt_accumulate: bool = False,
                   ttt_batch: int | None = None, length: int | None = None) -> Path:
    """eval-TASK[-lenL][-ttt[-accumulate | -batchN]].json in the model's directory, or in the run directory for a
    model inside a run's checkpoints (RUN/checkpoints/latest/model): the run's next checkpoint replaces that folder
    whole. A kept checkpoint's (RUN/checkpoints/step-NNNNNNNN/model) name ends in its folder's: -step-NNNNNNNN.
    `length` (niah / mqar: the prompts' length) is in the name, so that a sweep over --length keeps every result."""
    mode = "-accumulate" if ttt_accumulate else f"-batch{ttt_batch}" if ttt_batch is not None else ""
    task = task if length is None else f"{task}-len{length}"
    resolved = model_dir.resolve()
    folder, checkpoints = resolved.parent.name, resolved.parent.parent  # a run's: checkpoints/FOLDER/model
    in_run = (resolved.name == "model" and checkpoints.name == "checkpoints"
              and (folder in ("latest", "previous") or re.fullmatch(r"step-\d{8,}", folder) is not None))
    if not in_run:  # any other model directory, one in a folder named checkpoints/ too (an fla download's)
        return model_dir / f"eval-{task}{'-ttt' if ttt else ''}{mode}.json"
    kept = f"-{folder}" if folder.startswith("step-") else ""
    return checkpoints.parent / f"eval-{task}{'-ttt' if ttt else ''}{mode}{kept}.json"


def check_output(output: Path, given: bool) -> None:
    """Refuse, before any generation, a results path that could not be written after it."""
    name = f"--output {str(output)!r}" if given else f"the results file {str(output)!r} (the default; set --output)"
    if output.is_dir():
        raise ValueError(f"{name} is a directory; give a file path")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{name}: cannot create its directory ({error})") from None
    if not os.access(output.parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise ValueError(f"{name} is not writable")


def check_options_apply(options: EvalOptions, task: str, ttt: bool) -> None:
    """Refuse an eval option given for a run that would ignore it (as --length for a task file is refused)."""
    given = options.model_fields_set
    if "niah_variant" in given and task != "niah":
        raise ValueError(f"eval.niah_variant={options.niah_variant!r} is an option of --task niah, not {task}")
    if "prompt_templates" in given and task != "longbench":
        raise ValueError(f"eval.prompt_templates={options.prompt_templates!r} is an option of --task longbench, not "
                         f"{task}")
    if "batch_size" in given and ttt:
        raise ValueError(f"eval.batch_size={options.batch_size}: --ttt answers each prompt after adapting the weights "
                         f"to it (or each --ttt-batch after its updates), not eval.batch_size prompts together")
    if "longbench_scoring" in given and task != "longbench":
        raise ValueError(f"eval.longbench_scoring={options.longbench_scoring!r} is an option of --task longbench, not "
                         f"{task}")
    if "answer_top_k" in given and options.answer_top_k and options.answer_temperature == 0:
        raise ValueError(f"eval.answer_top_k={options.answer_top_k} samples among the most likely tokens, but answers "
                         f"are greedy (eval.answer_temperature=0): set eval.answer_temperature too")


# What `refine eval` reads of a run config: where and how the model runs, how bad task rows are met, and, with
# --ttt, how it adapts (the refine and optim sections, and --ttt-batch's mini- and micro-batches).
EVAL_READS = {"train.device", "train.threads", "train.dtype", "data.skip_bad_rows"}
TTT_READS = {"train.mini_batches", "train.micro_batches"}  # with --ttt-batch: they split its batches
# Test-time updates take optim.lr as it is: no schedule (per prompt, a schedule over --ttt-steps would restart).
TTT_UNSCHEDULED = {"optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio"}
TTT_SECTIONS = {"refine", "optim"}
# The flags that say what a run config's field says for a training run.
FLAGS_INSTEAD = {"tokenizer": "--tokenizer", "train.init_from": "--model", "train.steps": "--ttt-steps",
                 "train.seed": "--seed", "model": "--model (the model is the checkpoint's)"}


def check_overrides_apply(overrides: Sequence[str], config_file: str | None, ttt: bool,
                          ttt_batch: int | None = None) -> None:
    """Refuse run-config settings `refine eval` would not read (it reads EVAL_READS, with --ttt the refine and
    optim sections but for TTT_UNSCHEDULED, and with --ttt-batch TTT_READS): a --set train.steps=50 meant as
    --ttt-steps would otherwise change nothing."""
    if config_file is not None and not ttt:
        raise ValueError(f"--config {config_file}: its refine and optim sections drive --ttt, which is not given; "
                         f"without --ttt, set what eval reads ({', '.join(sorted(EVAL_READS))}) with --set")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if ttt and key in TTT_UNSCHEDULED:
            raise ValueError(f"--set {item}: test-time training takes no learning-rate schedule; its updates use "
                             f"optim.lr as it is")
        if ttt and ttt_batch is None and key in TTT_READS:
            raise ValueError(f"--set {item}: {key} splits the batches of --ttt-batch N (the released scripts' "
                             f"schedule), which is not given; --ttt alone adapts on each prompt, --ttt-steps times")
        if key in EVAL_READS or (ttt and (key in TTT_READS or key.split(".")[0] in TTT_SECTIONS)):
            continue
        flag = FLAGS_INSTEAD.get(key) or FLAGS_INSTEAD.get(key.split(".")[0])
        if flag:
            why = f"give {flag}"
        elif key.split(".")[0] in TTT_SECTIONS or key in TTT_READS:
            why = "it drives --ttt, which is not given"
        else:
            why = f"eval reads {', '.join(sorted(EVAL_READS))}, and with --ttt the refine and optim sections"
        raise ValueError(f"--set {item}: refine eval does not read {key}; {why}")


def main(args: argparse.Namespace) -> int:
    """`refine eval`: load, generate, score, print the summary line, write the results JSON."""
    overrides, options = split_overrides(args.set or [])
    # Eval reads --model: a run config's starting checkpoint (train.init_from, which supplies the model section it
    # does not read either) need not exist any more.
    run_config = load_config(args.config, [*overrides, "train.init_from=null"])
    if args.ttt_accumulate and not args.ttt:
        raise ValueError("--ttt-accumulate needs --ttt: it carries test-time adaptation across examples")
    if args.ttt_steps is not None:
        check_ttt_steps(args.ttt_steps)
        if not args.ttt:
            raise ValueError(f"--ttt-steps={args.ttt_steps} needs --ttt: it counts test-time updates on each prompt")
    check_ttt_batch(args.ttt_batch, args.ttt, args.ttt_accumulate, run_config.train.mini_batches)
    if args.ttt_batch is not None and args.ttt_steps is not None:
        raise ValueError(f"--ttt-steps={args.ttt_steps} and --ttt-batch={args.ttt_batch}: a batch takes "
                         f"train.mini_batches updates (one pass over its prompts), not --ttt-steps")
    check_overrides_apply(overrides, args.config, args.ttt, args.ttt_batch)
    check_options_apply(options, args.task, args.ttt)
    check_seed(args.seed)  # all of these before the model loads
    check_answer_budget(args.max_new_tokens)
    check_synthetic_length(args.task, args.length, args.num_examples)
    if options.prompt_templates is not None and not Path(options.prompt_templates).is_file():
        raise ValueError(f"eval.prompt_templates={options.prompt_templates!r} is not a file (LongBench's "
                         f"dataset2prompt.json, or one like it)")
    check_device(run_config.train.device)
    if run_config.train.threads:
        torch.set_num_threads(run_config.train.threads)
    model_dir = Path(args.model)
    check_model_dir(model_dir)  # first: the default results path lies in it
    if args.output:
        check_output_is_a_file_path(args.output, "--output")
    output = (Path(args.output) if args.output
              else default_output(model_dir, args.task, args.ttt, args.ttt_accumulate, args.ttt_batch,
                                  length=synthetic_length(args.task, args.length)))
    check_output(output, given=bool(args.output))
    check_output_spares_inputs(output, {"--data": args.data, "--tokenizer": args.tokenizer, "--config": args.config,
                                        "eval.prompt_templates": options.prompt_templates},
                               flag="--output" if args.output else "the results file", model_dir=model_dir)
    tokenizer = resolve_tokenizer(args.tokenizer, model_dir)
    check_tokenizer_fits(load_model_config(model_dir), tokenizer, f"--model {str(model_dir)!r}")  # before the weights
    dtype = DTYPES[run_config.train.dtype] if "dtype" in run_config.train.model_fields_set else None
    model = load_model(model_dir, dtype=dtype, device=run_config.train.device)
    loaded = LoadReport()
    examples = build_examples(args, tokenizer, options, skip_bad_rows=run_config.data.skip_bad_rows, report=loaded)
    try:
        results = evaluate(
            model, tokenizer, examples, args.task, ttt=args.ttt, run_config=run_config,
            ttt_steps=DEFAULT_TTT_STEPS if args.ttt_steps is None else args.ttt_steps, ttt_batch=args.ttt_batch,
            max_new_tokens=args.max_new_tokens, max_prompt_tokens=options.max_prompt_tokens, seed=args.seed,
            batch_size=options.batch_size, ttt_accumulate=args.ttt_accumulate,
            longbench_scoring=options.longbench_scoring, answer_temperature=options.answer_temperature,
            answer_top_k=options.answer_top_k, progress=not args.no_progress,
        )
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the answers so far are not kept, say so
        kept = " (the earlier file there is kept as it was)" if output.exists() else ""
        _note(f"interrupted: nothing written to {str(output)!r}{kept}; the same command evaluates again")
        raise
    summary = results["summary"]
    summary.update(model=str(model_dir), data=args.data, seed=args.seed, tokenizer=repr(tokenizer))
    if args.data is not None:  # rows of the task file skipped as malformed (data.skip_bad_rows), as posttrain.json
        summary["skipped_bad_rows"] = loaded.bad_rows
    generated = synthetic_set(args.task, args.seed)
    if generated is not None:
        summary["synthetic_set"] = generated
    # What made these prompts and answers, so that results of a sweep (over --length, say) tell apart.
    summary["settings"] = {"max_new_tokens": args.max_new_tokens, "max_prompt_tokens": options.max_prompt_tokens}
    if args.task in ("niah", "mqar"):
        summary["settings"]["length"] = synthetic_length(args.task, args.length)
    if args.task == "niah":
        summary["settings"]["niah_variant"] = options.niah_variant
    line = {key: summary[key] for key in ("task", "num_examples", "score", "ttt", "seconds")}
    try:
        # Replaced whole: an earlier file survives a failure (a link, a FIFO: written through, see write_output).
        write_output(output, json.dumps(results, indent=1, ensure_ascii=False))
    except OSError as error:
        # A full disk after the whole evaluation: the summary line still gives its score (output null).
        print(json.dumps(line | {"metric": summary["metric"], "output": None}, ensure_ascii=False))
        raise OSError(f"{error}: the results of {summary['num_examples']} examples were not written (the summary "
                      f"line above has their score); rerun once the file can be written, or with another --output"
                      ) from None
    print(json.dumps(line | {"metric": summary["metric"], "output": str(output)}, ensure_ascii=False))
    return 0
