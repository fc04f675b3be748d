"""`refine eval`: greedy (or sampled) answers on a task (optionally after test-time REFINE per prompt), scored
with the task's own benchmark metric, written to a results JSON. This module is the command: its options and the
checks run on them before the model loads, the examples it answers, and where and how it writes the results; the
answering is refine.evaluation.answering's `evaluate`, the scoring refine.evaluation.task_scoring's.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError, field_validator

from refine.checkpoints import PROGRAM_FILE, checkpoint_step
from refine.config import (
    DTYPES, MAX_SYNTHETIC_LENGTH, MAX_SYNTHETIC_TOKENS, OptimConfig, greedy_or_sampled, load_config,
)
from refine.config_parsing import ConfigError, parse_yaml
from refine.data.sources import DataSourceError
from refine.data.synthetic import NiahConfig, NiahVariant, Purpose, generate_niah, mqar_for_length, stream_salt
from refine.data.tasks import LoadReport, TaskExample, load_longbench, load_ruler_qa
from refine.evaluation.answering import (
    check_answer_budget, check_seed, check_tokenizer_fits, check_ttt_batch, check_ttt_steps, eval_note, evaluate,
)
from refine.evaluation.metrics import LongBenchScoring
from refine.files import check_output_is_a_file_path, check_output_spares_inputs, write_output
from refine.loop import check_device
from refine.models import load_model, load_model_config
from refine.models.config import Strict
from refine.tokenizer import Tokenizer, resolve_tokenizer

CLI_TASKS = ("niah", "mqar", "ruler-qa", "longbench")
DEFAULT_TTT_STEPS = 2  # --ttt-steps: the REFINE updates on each prompt
DEFAULT_SYNTHETIC_LENGTH = 512  # --length for niah / mqar when not given
DEFAULT_SYNTHETIC_EXAMPLES = 20  # --num-examples for niah / mqar when not given; task files default to every row
# niah / mqar prompts come from the generators' evaluation streams: salted apart from the training corpus's, so
# that no --seed (the default 1234 included) reproduces the documents a run trained on, whatever its train.seed.
SYNTHETIC_PURPOSE: Purpose = "eval"


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


# ---------------------------------------------------------------- examples


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
                   skip_bad_rows: bool = False, report: LoadReport | None = None, fmt: str = "auto"
                   ) -> list[TaskExample]:
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
            return load_ruler_qa(args.data, fmt=fmt, limit=args.num_examples, skip_bad_rows=skip_bad_rows,
                                 report=report)
        return load_longbench(args.data, fmt=fmt, limit=args.num_examples, prompt_templates=options.prompt_templates,
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


# ---------------------------------------------------------------- the model, the results and the run config


def check_model_dir(model_dir: Path) -> None:
    """Refuse, before anything is written next to it, a --model that is not a model directory."""
    name = f"--model {str(model_dir)!r}"
    if not model_dir.exists():
        # A run swaps its new checkpoint in through checkpoints/previous: caught between, or killed there. (Only
        # under .../latest/: the name-less parent of a typo in '.' or '/' takes no with_name().)
        if model_dir.parent.name == "latest":
            previous = model_dir.parent.with_name("previous") / model_dir.name
            if (previous / "config.json").is_file():
                raise ValueError(f"{name} does not exist, but {str(previous)!r} does: the run is replacing its "
                                 f"checkpoint (evaluate again in a moment), or was killed while it did (evaluate that "
                                 f"one; its --resume continues from it)")
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


def run_checkpoint_step(model_dir: Path) -> int | None:
    """The step of the run's checkpoint whose model `model_dir` is (one with a PROGRAM_FILE); None for any other
    model."""
    checkpoint = model_dir.resolve().parent
    return checkpoint_step(checkpoint) if (checkpoint / PROGRAM_FILE).is_file() else None


def check_output(output: Path, given: bool) -> None:
    """Refuse, before any generation, a results path that could not be written after it. Its missing folders are
    created only when the results are written: an evaluation stopped before then leaves no empty folder behind."""
    name = f"--output {str(output)!r}" if given else f"the results file {str(output)!r} (the default; set --output)"
    if output.is_dir():
        raise ValueError(f"{name} is a directory; give a file path")
    existing = output.parent
    while not existing.exists() and existing != existing.parent:  # the nearest folder there is, to create the rest in
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name}: cannot create its directory ({str(existing)!r} is a file, not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK) or (output.exists() and not os.access(output, os.W_OK)):
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


# What `refine eval` reads of a run config: where and how the model runs, how task files are read, and, with
# --ttt, how it adapts (the refine and optim sections, and --ttt-batch's mini- and micro-batches).
EVAL_READS = {"train.device", "train.threads", "train.dtype", "data.skip_bad_rows", "data.format"}
TTT_READS = {"train.mini_batches", "train.micro_batches"}  # with --ttt-batch: they split its batches
# Test-time updates take optim.lr as it is: no schedule (per prompt, a schedule over --ttt-steps would restart).
TTT_UNSCHEDULED = {"optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio"}
TTT_SECTIONS = {"refine", "optim"}
# The flags that say what a run config's field says for a training run.
FLAGS_INSTEAD = {"tokenizer": "--tokenizer", "train.init_from": "--model", "train.steps": "--ttt-steps",
                 "train.seed": "--seed", "model": "--model (the model is the checkpoint's)"}


def check_no_ttt_schedule(overrides: Sequence[str], ttt: bool) -> None:
    """Refuse a learning-rate schedule setting (TTT_UNSCHEDULED) with --ttt: test-time updates take optim.lr."""
    if not ttt:
        return
    for item in overrides:
        if item.split("=", 1)[0].strip() in TTT_UNSCHEDULED:
            raise ValueError(f"--set {item}: test-time training takes no learning-rate schedule; its updates use "
                             f"optim.lr as it is")


def check_overrides_apply(overrides: Sequence[str], config_file: str | None, ttt: bool,
                          ttt_batch: int | None = None) -> None:
    """Refuse run-config settings `refine eval` would not read (it reads EVAL_READS, with --ttt the refine and
    optim sections but for TTT_UNSCHEDULED, which check_no_ttt_schedule refused before the config was read, and with
    --ttt-batch TTT_READS): a --set train.steps=50 meant as --ttt-steps would otherwise change nothing."""
    if config_file is not None and not ttt:
        raise ValueError(f"--config {config_file}: its refine and optim sections drive --ttt, which is not given; "
                         f"without --ttt, set what eval reads ({', '.join(sorted(EVAL_READS))}) with --set")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
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
    # Before the config's own checks: `--ttt --set optim.min_lr_ratio=0.5` was told to set optim.schedule=cosine,
    # which check_overrides_apply then refused.
    check_no_ttt_schedule(overrides, args.ttt)
    # Eval reads --model: a run config's starting checkpoint (train.init_from, which supplies the model section it
    # does not read either) need not exist any more, and that section (its config.json's: a dtype, other libraries'
    # keys) is not held to the checks of one written by hand.
    run_config = load_config(args.config, [*overrides, "train.init_from=null"],
                             unread={"data.min_length", "data.seq_len", "model"})  # test-time training fits each prompt
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
    if args.config is not None and args.ttt:  # a run's config.yaml is welcome; its schedule is not taken (--set: refused)
        schedule = [f"optim.{key}={getattr(run_config.optim, key)!r}" for key in ("schedule", "warmup_steps",
                    "min_lr_ratio") if getattr(run_config.optim, key) != OptimConfig.model_fields[key].default]
        if schedule:
            eval_note(f"--config {args.config}: {', '.join(schedule)} not applied: test-time updates take optim.lr="
                      f"{run_config.optim.lr:g} as it is, with no learning-rate schedule")
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
    step = run_checkpoint_step(model_dir)
    model = load_model(model_dir, dtype=dtype, device=run_config.train.device)
    step_after = run_checkpoint_step(model_dir)
    if step_after != step:  # a live run's next checkpoint: its files and the last one's may mix
        raise ValueError(f"--model {str(model_dir)!r}: the run replaced this checkpoint while it was read (step "
                         f"{step}, then {step_after}): evaluate again, or a kept checkpoint "
                         f"(train.keep_checkpoints: checkpoints/step-NNNNNNNN/model)")
    loaded = LoadReport()
    examples = build_examples(args, tokenizer, options, skip_bad_rows=run_config.data.skip_bad_rows, report=loaded,
                              fmt=run_config.data.format)
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
        eval_note(f"interrupted: nothing written to {str(output)!r}{kept}; the same command evaluates again")
        raise
    summary = results["summary"]
    summary.update(model=str(model_dir), data=args.data, seed=args.seed, tokenizer=repr(tokenizer))
    if step is not None:  # a run's checkpoint: which one was scored (latest/ moves on with the run)
        summary["checkpoint_step"] = step
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
        output.parent.mkdir(parents=True, exist_ok=True)
        write_output(output, json.dumps(results, indent=1, ensure_ascii=False))
    except OSError as error:
        # A full disk after the whole evaluation: the summary line still gives its score (output null).
        print(json.dumps(line | {"metric": summary["metric"], "output": None}, ensure_ascii=False))
        raise OSError(f"{error}: the results of {summary['num_examples']} examples were not written (the summary "
                      f"line above has their score); rerun once the file can be written, or with another --output"
                      ) from None
    print(json.dumps(line | {"metric": summary["metric"], "output": str(output)}, ensure_ascii=False))
    return 0
