"""`refine posttrain`: post-training on (context, question, answer) task data, the paper's "nested" phase.

Each training step runs `refine.phases.posttrain_step` on `train.batch_size` examples, in the paper code's
order: REFINE (rollouts and NTP) over the prompts (context and question, as the paper's code and as
test-time training in `refine eval --ttt-steps` adapt on them), then one optimizer step on SFT
(cross-entropy) of the answers given the prompts, at the weights REFINE produced. REFINE takes one fused
optimizer step (`train.mode=fused`, the default), or, as the paper's code, samples the batch's rollouts
once and takes an optimizer step per mini-batch of prompts (`train.mode=onepass`,
`train.mini_batches`: its demo takes 1,024 examples per batch in mini-batches of 16, so 64 REFINE steps
per SFT step); `train.mode=ntp` gives the NTP + SFT baseline.

    refine posttrain --data qa.jsonl --task ruler-qa --config configs/posttrain.yaml [--set ...] [--resume]

How a task example becomes tokens (the same ones `refine eval` feeds the model, see `prompt_tokens`):
- the prompt is what the model reads: BOS and the example's prompt text.
- the SFT target is the first gold answer followed by the tokenizer's EOS, since evaluation stops each
  answer at EOS.
- a sequence longer than `data.seq_len` tokens is cut in the context's middle (start and end kept, as
  `refine eval` cuts prompts), so the question and the answer survive whole. The context is the example's
  own when it keeps one apart (LongBench rows with `context` and `input`) and the prompt contains it: the
  prompt up to its end (BOS, any instruction, the context); otherwise (RULER QA, whose rows hold one
  prompt) the whole prompt.
- an example whose prompt is shorter than REFINE needs (`min_document_length` of refine.num_chunks,
  rollout_len, margin) is skipped and counted; if none is left, the run fails naming the file and the length.

The model is `train.init_from` (a checkpoint directory); the tokenizer is `tokenizer`, else the model
directory's, else byte-level. The run directory (`train.out_dir`) gets config.yaml, posttrain.json (the
data summary and --sft-coef), metrics.jsonl (a row per step) and checkpoints/latest/ (model/, with the
tokenizer's files copied next to it, trainer.pt and program.json), as `refine train` writes them. Unset, the reward
is the paper's post-training one (hybrid) and the run directory runs/posttrain (POSTTRAIN_DEFAULTS). One process
runs it: the service (`service.*`) and `rollout.*` settings do not apply.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from refine.algorithm.rewards import check_run_reward
from refine.algorithm.selection import min_document_length
from refine.checkpoints import RUN_RECORDS, check_resumed_program, resume_from
from refine.config import DataSpec, RunConfig, fit_to_tokenizer, load_config, run_tokenizer
from refine.data.tasks import LoadReport, TaskExample, load_longbench, load_ruler_qa
from refine.evaluation.answering import prompt_tokens
from refine.files import write_atomically
from refine.loop import StepBatch, prepare_model, run_steps
from refine.phases import QAExample, check_no_kl_term, check_sft_coef, posttrain_step
from refine.run_files import (
    absolute_out_dir, check_data_apart_from_run, check_resumed_run, finished_run, start_run_directory,
)
from refine.run_lock import run_directory_lock
from refine.runtime import StageTimes, callers_torch_state_kept, note, tune_allocator
from refine.step import StepResult, check_mini_batches, make_optimizer
from refine.tokenizer import Tokenizer

POSTTRAIN_TASKS = ("ruler-qa", "longbench")
# What posttrain reads of the data section: the rest describes a document source (refused when set).
POSTTRAIN_DATA_READS = {"seq_len", "format", "skip_bad_rows"}
# The paper's post-training reward, and the run's own folder, wherever the config leaves the field unset (as
# `refine eval --ttt` takes the test-time defaults): a config file, --set or a library caller's RunConfig.
POSTTRAIN_DEFAULTS: dict[str, dict[str, Any]] = {"refine": {"reward": "hybrid"}, "train": {"out_dir": "runs/posttrain"}}


class DataSummary(BaseModel):
    """What the run trains on; written to OUT_DIR/posttrain.json and printed when examples were skipped."""

    data: str
    task: str
    sft_coef: float
    examples_read: int
    examples_used: int
    skipped_short_prompt: int
    skipped_long_question: int  # question and answer alone fill data.seq_len: no room for the context
    truncated: int
    min_prompt_tokens: int
    skipped_bad_rows: int = 0  # rows of the task file skipped as malformed (data.skip_bad_rows)


# ---------------------------------------------------------------- checks


def check_config(config: RunConfig, sft_coef: float) -> None:
    """Refuse settings the nested step cannot honor, rather than silently ignoring them."""
    if config.train.init_from is None:
        raise ValueError("train.init_from is not set: post-training starts from a trained model; give its checkpoint "
                         "directory, e.g. --set train.init_from=checkpoints/delta_net-1.3B-100B")
    if config.train.micro_batches > 1:  # first: check_mini_batches would advise onepass, which refuses them too
        raise ValueError(f"train.micro_batches={config.train.micro_batches}: post-training's SFT step trains on the "
                         f"whole batch at once, so micro-batches would not bound its memory; lower train.batch_size")
    check_mini_batches(config)
    if config.data.eval_source is not None:
        raise ValueError(f"data.eval_source={config.data.eval_source!r}: refine posttrain measures no held-out loss "
                         f"(refine eval scores a post-trained model); leave it unset")
    if config.data.shuffle:
        raise ValueError("data.shuffle=true: refine posttrain reads --data, not data.source, and draws its examples "
                         "in a new order every pass already (from train.seed); leave it unset")
    if config.data.source != DataSpec.model_fields["source"].default:
        raise ValueError(f"data.source={config.data.source!r}: refine posttrain reads its examples from --data; leave "
                         f"data.source unset")
    if config.data.min_length != DataSpec.model_fields["min_length"].default:
        raise ValueError(f"data.min_length={config.data.min_length}: refine posttrain skips the examples whose prompt "
                         f"is too short for REFINE's rollouts (refine.num_chunks, rollout_len and margin set how short)"
                         f"; leave data.min_length unset")
    for name, field in DataSpec.model_fields.items():
        if name not in POSTTRAIN_DATA_READS and getattr(config.data, name) != field.default:
            raise ValueError(f"data.{name}={getattr(config.data, name)!r} is a setting of a document source "
                             f"(data.source); refine posttrain reads its examples from --data and of the data "
                             f"section only {', '.join(f'data.{read}' for read in sorted(POSTTRAIN_DATA_READS))}: "
                             f"leave it unset")
    check_no_kl_term(config.refine, "refine posttrain")
    # Beyond float32's largest number the coefficient is inf in the float32 loss: every SFT update is skipped.
    check_sft_coef(sft_coef, "--sft-coef")
    # The nested step scores its rollouts in this process, from tokens and hidden states: no text.
    check_run_reward(config.refine.reward, config.refine.reward_modules, decodes_text=False)


# ---------------------------------------------------------------- examples


def load_examples(task: str, path: str | Path, skip_bad_rows: bool = False,
                  report: LoadReport | None = None, fmt: str = "auto") -> list[TaskExample]:
    """The task file's examples (`fmt`: data.format); `report` receives how many were read and how many bad rows
    were skipped."""
    if task == "ruler-qa":
        return load_ruler_qa(path, fmt=fmt, skip_bad_rows=skip_bad_rows, report=report)
    if task == "longbench":
        return load_longbench(path, fmt=fmt, skip_bad_rows=skip_bad_rows, report=report)
    raise ValueError(f"--task must be one of {POSTTRAIN_TASKS}, got {task!r}")


def split_prompt(example: TaskExample) -> tuple[str, str]:
    """(context text, question text) whose concatenation is the prompt: where a long prompt is cut (see the
    module docstring)."""
    if example.context:
        start = example.prompt.find(example.context)
        if start >= 0:
            end = start + len(example.context)
            return example.prompt[:end], example.prompt[end:]
    return example.prompt, ""


def encode_example(example: TaskExample, tokenizer: Tokenizer, max_tokens: int) -> tuple[QAExample | None, bool]:
    """Token ids of one example, at most `max_tokens` in all (the context cut in the middle to fit).
    Returns (example, whether its prompt was cut); (None, True) when the question and the answer alone
    take `max_tokens`, leaving no room for the context."""
    answer = tokenizer.encode(example.answers[0]) + [tokenizer.eos_id]
    # A prompt that fits is encoded whole, as `refine eval` encodes it: encoding context and question apart
    # would split a subword tokenizer's merges across their boundary (a context's closing "\n" and "\n\n").
    prompt, full_length = prompt_tokens(tokenizer, example.prompt, None)
    if full_length + len(answer) <= max_tokens:
        return QAExample(prompt=prompt, answer=answer), False
    context_text, question_text = split_prompt(example)
    question = tokenizer.encode(question_text)
    room = max_tokens - len(question) - len(answer)
    if room <= 0:
        return None, True
    context, full_length = prompt_tokens(tokenizer, context_text, room)
    return QAExample(prompt=context + question, answer=answer), len(context) < full_length


def prepare_examples(examples: Sequence[TaskExample], tokenizer: Tokenizer, config: RunConfig, data: str | Path,
                     task: str, sft_coef: float, bad_rows: int = 0) -> tuple[list[QAExample], DataSummary]:
    """Encode every example and keep those whose prompt can host REFINE's rollouts."""
    cfg = config.refine
    needed = min_document_length(cfg.num_chunks, cfg.rollout_len, cfg.margin)
    usable: list[QAExample] = []
    truncated = long_question = short_after_cut = 0
    for example in examples:
        encoded, cut = encode_example(example, tokenizer, config.data.seq_len)
        if encoded is None:
            long_question += 1
        elif len(encoded.prompt) >= needed:
            usable.append(encoded)
            truncated += cut  # of the examples trained on: a cut one left too short is counted as that
        else:
            short_after_cut += cut
    # The file's absolute path: the record names it wherever a resume runs from, however the path is spelled.
    summary = DataSummary(data=str(Path(data).resolve()), task=task, sft_coef=sft_coef, examples_read=len(examples),
                          examples_used=len(usable), skipped_short_prompt=len(examples) - len(usable) - long_question,
                          skipped_long_question=long_question, truncated=truncated, min_prompt_tokens=needed,
                          skipped_bad_rows=bad_rows)
    wanted = (f"refine.num_chunks={cfg.num_chunks}, rollout_len={cfg.rollout_len} and margin={cfg.margin} need "
              f"prompts of >= {needed} tokens")
    if not usable:
        reasons = []
        if summary.skipped_short_prompt:
            reasons.append(f"{summary.skipped_short_prompt} have a prompt too short for REFINE ({wanted}; "
                           f"data.seq_len={config.data.seq_len} bounds context + question + answer)")
        if long_question:
            reasons.append(f"{long_question} have a question and answer that alone fill data.seq_len="
                           f"{config.data.seq_len} tokens, leaving no room for the context")
        raise ValueError(f"no example of {str(data)!r} can be trained on: of its {len(examples)} examples, "
                         f"{' and '.join(reasons)}")
    if summary.skipped_short_prompt:
        cut_note = (f"; {short_after_cut} of them were cut to fit data.seq_len={config.data.seq_len}, where their "
                    f"question and answer leave too little room" if short_after_cut else "")
        _note(f"skipped {summary.skipped_short_prompt} of {len(examples)} examples of {str(data)!r} whose prompt "
              f"is too short ({wanted}{cut_note})")
    if long_question:
        _note(f"skipped {long_question} of {len(examples)} examples of {str(data)!r} whose question and answer "
              f"alone fill data.seq_len={config.data.seq_len} tokens")
    if truncated:
        _note(f"{truncated} examples cut in the middle to data.seq_len={config.data.seq_len} tokens")
    return usable, summary


def record_data(out_dir: Path, summary: DataSummary, resumed: bool) -> None:
    """Write what the run trains on to OUT_DIR/posttrain.json. A resumed run keeps the record of the data its
    run started on and says what differs now: its data cursor then counts examples of other data."""
    record = out_dir / RUN_RECORDS["refine posttrain"]
    if resumed and record.exists():
        try:
            recorded = DataSummary.model_validate_json(record.read_text())
        except (OSError, ValueError) as error:
            _note(f"{record} could not be read ({error}): it is written anew")
        else:
            changed = {key: (before, after) for key, before, after in
                       ((key, getattr(recorded, key), getattr(summary, key)) for key in ("data", "task", "sft_coef",
                                                                                          "examples_used"))
                       if before != after and not (key == "data" and _same_path(before, after))}
            if changed:
                what = ", ".join(f"{key} was {before!r}, now {after!r}" for key, (before, after) in changed.items())
                _note(f"warning: this run started on other data or settings ({what}): the resumed data cursor "
                      f"counts the examples of the data as they are now; {record} keeps the run's first record")
            return
    write_atomically(record, summary.model_dump_json(indent=1))


def _same_path(recorded: str, now: str) -> bool:
    """Whether two spellings of the task file name the same one (a record written before records held absolute
    paths is relative to where the run started, taken here as the working directory)."""
    try:
        return Path(recorded).resolve() == Path(now).resolve()
    except (OSError, RuntimeError):
        return False


def batch_indices(num_examples: int, seed: int, cursor: int, batch_size: int) -> list[int]:
    """Examples cursor .. cursor + batch_size - 1 of an endless stream over the data: every pass is a fresh
    shuffle seeded by (seed, pass), so a resumed run draws exactly what an uninterrupted one would."""
    first, last = cursor // num_examples, (cursor + batch_size - 1) // num_examples
    order: list[int] = []
    for epoch in range(first, last + 1):
        shuffled = list(range(num_examples))
        random.Random(f"{seed}:{epoch}").shuffle(shuffled)
        order.extend(shuffled)
    start = cursor - first * num_examples
    return order[start:start + batch_size]


# ---------------------------------------------------------------- training


def with_posttrain_defaults(config: RunConfig) -> RunConfig:
    """`config` with POSTTRAIN_DEFAULTS in every field it leaves unset."""
    sections = {}
    for section, defaults in POSTTRAIN_DEFAULTS.items():
        values = getattr(config, section)
        unset = {name: value for name, value in defaults.items() if name not in values.model_fields_set}
        if unset:
            sections[section] = values.model_copy(update=unset)
    return config.model_copy(update=sections)


def posttrain(config: RunConfig, data: str | Path, task: str, sft_coef: float = 1.0, resume: bool = False,
              progress: bool = True) -> dict[str, float]:
    """Run `config.train.steps` nested post-training steps on the task file; returns the last step's stats.
    Settings the config leaves unset take POSTTRAIN_DEFAULTS (the hybrid reward, runs/posttrain). torch's
    global generator and thread count are the caller's again afterwards."""
    config = with_posttrain_defaults(config)
    with callers_torch_state_kept(config.train.device):
        return _posttrain(config, data, task, sft_coef, resume, progress)


def _posttrain(config: RunConfig, data: str | Path, task: str, sft_coef: float, resume: bool,
               progress: bool) -> dict[str, float]:
    if resume:  # first: another program's run explains every setting of its config that posttrain refuses
        check_resumed_program(Path(absolute_out_dir(config)), "refine posttrain")
    check_config(config, sft_coef)
    check_data_apart_from_run(config, data)
    tune_allocator()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    tokenizer = run_tokenizer(config)
    loaded = LoadReport()
    examples, summary = prepare_examples(load_examples(task, data, config.data.skip_bad_rows, loaded,
                                                       config.data.format), tokenizer,
                                         config, data, task, sft_coef, bad_rows=loaded.bad_rows)
    config = fit_to_tokenizer(config, tokenizer)
    model = prepare_model(config)
    optimizer = make_optimizer(model, config.optim)
    generator = torch.Generator(device=config.train.device).manual_seed(config.train.seed)

    start = resume_from(Path(config.train.out_dir), resume, model, optimizer, generator, "refine posttrain",
                        tokenizer)
    data_counts = {"examples_used": summary.examples_used, "skipped_short_prompt": summary.skipped_short_prompt}
    if start.step and start.step >= config.train.steps:  # the run directory (config.yaml too) stays as it is
        finished = finished_run(Path(config.train.out_dir), start.step, config.train.steps, "refine posttrain")
        return finished | data_counts
    with run_directory_lock(config.train.out_dir, "refine posttrain"):  # held until the run ends
        # Only now: a run that cannot start leaves the directory as it was.
        out_dir = start_run_directory(config, fresh=start.step == 0, program="refine posttrain")
        record_data(out_dir, summary, resumed=start.step > 0)

        def next_batch(cursor: int) -> StepBatch:
            indices = batch_indices(len(examples), config.train.seed, cursor, config.train.batch_size)
            batch = [examples[i] for i in indices]

            def update(times: StageTimes) -> StepResult:
                # One stage for the whole nested step: posttrain_step takes no timer for its parts.
                with times.stage("nested_step"):
                    return posttrain_step(model, optimizer, batch, config, sft_coef, generator, tokenizer.pad_id)

            tokens = sum(len(ex.prompt) + len(ex.answer) for ex in batch)
            return StepBatch(update=update, cursor=cursor + len(batch), tokens=tokens)

        resume_command = ["refine", "posttrain", "--data", summary.data, "--task", task,
                          "--config", str(out_dir.resolve() / "config.yaml"), "--resume"]
        if sft_coef != 1.0:
            resume_command[-1:-1] = ["--sft-coef", repr(sft_coef)]
        last = run_steps(config, model, optimizer, generator, tokenizer, next_batch, start, desc="posttrain",
                         shown=("loss", "sft_loss", "reward_mean"), progress=progress, resume_command=resume_command)
        return last | data_counts


def _note(message: str) -> None:
    note(f"refine posttrain: {message}")


def main(args: argparse.Namespace) -> int:
    """`refine posttrain`: load the config, train (the paper's post-training defaults where it is silent), print
    the last step's stats as one JSON line."""
    config = with_posttrain_defaults(load_config(args.config, args.set, unread={"data.min_length"}))
    if args.resume:
        check_resumed_run(args.config, config)
    stats = posttrain(config, args.data, args.task, sft_coef=args.sft_coef, resume=args.resume,
                      progress=not args.no_progress)
    print(json.dumps({"out_dir": absolute_out_dir(config), **stats}))
    return 0
