"""The `refine` command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import select
import sys
from collections.abc import Callable
from pathlib import Path

from refine.config import DEMO_DEFAULTS, RunConfig, load_config
from refine.config_parsing import ConfigError, parse_overrides
from refine.example_configs import DEFAULT_DIR, copy_examples
from refine.runtime import command_exit, sigterm_as_ctrl_c, tune_allocator
from refine.unread_settings import unread_overrides


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of steps, repeats, threads, tokens)."""
    return int_at_least(1)(text)


def address(started: str) -> Callable[[str], str]:
    """An argparse type: a service address that is not empty. An empty "$VAR" in a job script would otherwise run on
    `started` (the flag left out), unnoticed."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty ({text!r}): leave the flag out to start {started} for the run")
        return text
    return parse


def int_at_least(least: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least`; `why` says why, in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}{why}, got {value}")
        return value

    return parse


def runs_locally(mode: str, args: argparse.Namespace) -> bool:
    """Whether a run of train.mode `mode` uses the single-process loop: with --local, and always for
    NTP-only and reference-path runs, which have no rollouts to distribute."""
    return args.local or mode in ("ntp", "reference")


def run_training(config: RunConfig, args: argparse.Namespace, resume_command: list[str] | None = None,
                 job_stage: bool = False) -> dict:
    """One training run: the single-process loop with --local, else the distributed service. `resume_command`:
    what a stop (Ctrl-C, SIGTERM) says goes on (default: the run's own `refine train CONFIG --resume`);
    `job_stage`: the run is a stage of the main job, which a stop during its last step ends too (refine.loop)."""
    if runs_locally(config.train.mode, args):
        from refine.loop import train

        return train(config, resume=args.resume, progress=not args.no_progress, resume_command=resume_command,
                     job_stage=job_stage)
    from services.orchestrator import run  # whose first check, before Ray and Redis start, is the reward's

    return run(config, resume=args.resume, progress=not args.no_progress, ray_address=args.ray_address,
               redis_url=args.redis_url, resume_command=resume_command, job_stage=job_stage)


def as_trained(stage: RunConfig, args: argparse.Namespace) -> RunConfig:
    """A main job's stage as it trains: the REFINE branch on the service takes the train.mode its service.mode
    trains (one-pass disaggregated, fused colocated), which its config.yaml then records; the others run in this
    process, in their own train.mode."""
    if runs_locally(stage.train.mode, args):
        return stage
    from services.run_checks import with_service_train_mode

    return with_service_train_mode(stage)


def check_service_branch(config: RunConfig) -> None:
    """Before the main job's NTP pre-training (minutes): the service can run its REFINE branch, in the train.mode
    its service.mode trains (as_trained); a train.mode the config gives for the other is said, not refused: the
    main job's configs/demo.yaml names fused for its --local run."""
    from services.run_checks import check_service_config, with_service_train_mode

    branch = with_service_train_mode(config)
    check_service_config(branch)
    given = config.train.mode
    if "mode" in config.train.model_fields_set and given not in ("ntp", branch.train.mode):
        print(f"refine: the main job's REFINE branch trains train.mode={branch.train.mode} on the service "
              f"(service.mode={config.service.mode!r}), not train.mode={given}, and its config.yaml says so: "
              f"--local trains it {given}", file=sys.stderr)


def service_flags(args: argparse.Namespace) -> list[str]:
    """--ray-address and --redis-url as given (a Redis URL's password not printed), for a resume command: they
    are nowhere in a run's config.yaml."""
    from services.redis_server import redact_url

    flags = ["--ray-address", args.ray_address] if args.ray_address else []
    return flags + (["--redis-url", redact_url(args.redis_url)] if args.redis_url else [])


def main_job_resume_command(args: argparse.Namespace, config: RunConfig) -> list[str]:
    """The main job's own command line with --resume: each stage goes on from its checkpoint (a finished one
    says so and trains nothing). A relative run directory is pinned, so that it resumes from anywhere."""
    from refine.run_files import absolute_out_dir

    # absolute(), not resolve(): the file read, as the user named it (a checkout's configs/demo.yaml, not the package
    # folder its configs/ links to).
    command = ["refine", "train"] + ([str(Path(args.config).absolute())] if args.config else [])
    pinned = [] if Path(config.train.out_dir).is_absolute() else [f"train.out_dir={absolute_out_dir(config)}"]
    for item in [*args.set, *pinned]:
        command += ["--set", item]
    return command + (["--local"] if args.local else service_flags(args)) + ["--resume"]


def in_process_reason(config: RunConfig, args: argparse.Namespace) -> str | None:
    """Why this run trains in this process, without Ray or Redis, or None (the main job's REFINE stage runs on
    the service unless --local)."""
    if args.local:
        return "--local"
    if config.demo is None and runs_locally(config.train.mode, args):
        return f"train.mode={config.train.mode} (no rollouts to distribute)"
    return None


def unused_vllm_engine(config: RunConfig, args: argparse.Namespace) -> str | None:
    """What makes a run sample its rollouts without the rollout workers that rollout.engine=vllm sets up, if
    anything."""
    why = in_process_reason(config, args)
    if why is None and config.service.mode == "colocated":
        why = "service.mode='colocated'"
    return why


def _train(args: argparse.Namespace) -> int:
    from refine.run_files import absolute_out_dir, check_resumed_run

    # No config file: the main job (REFINE vs NTP comparison) on its embedded defaults.
    config = load_config(args.config, args.set, defaults=DEMO_DEFAULTS)
    if args.resume:
        check_resumed_run(args.config, config)
    unused = [flag for flag, value in (("--ray-address", args.ray_address), ("--redis-url", args.redis_url)) if value]
    why = in_process_reason(config, args)
    if unused and why is not None:  # the single-process loop uses neither
        print(f"refine: {' and '.join(unused)} unused: {why} trains in this process, without Ray or Redis",
              file=sys.stderr)
    for warning in unread_overrides(config, [key for key, _ in parse_overrides(args.set)], why):
        print(f"refine: {warning}", file=sys.stderr)
    if config.demo is None and config.rollout.engine == "vllm":
        where = unused_vllm_engine(config, args)
        if where is not None:
            print(f"refine: rollout.engine='vllm' unused: {where} samples its rollouts in the training process, "
                  f"with the snapshot engine (vLLM serves the disaggregated service's rollout workers)",
                  file=sys.stderr)
    if config.demo is not None:
        from refine.experiment import refine_stage_mode, run_comparison

        on_service = not runs_locally(refine_stage_mode(config), args)
        if on_service:
            check_service_branch(config)
        # Only the service's disaggregated reward replicas decode text for a text reward.
        decodes_text = on_service and config.service.mode == "disaggregated"
        resume_command = main_job_resume_command(args, config)
        report = run_comparison(config, lambda stage: run_training(as_trained(stage, args), args, resume_command,
                                                                   job_stage=True),
                                decodes_text=decodes_text, resume=args.resume)
        print(json.dumps({"out_dir": absolute_out_dir(config), "wall_seconds": report["wall_seconds"]}))
        return 0
    flags = [] if runs_locally(config.train.mode, args) else service_flags(args)
    # A service run's config.yaml holds absolute paths; the addresses given here it does not hold.
    resume_command = ["refine", "train", str(Path(absolute_out_dir(config)) / "config.yaml"), *flags,
                      "--resume"] if flags else None
    stats = run_training(config, args, resume_command)
    print(json.dumps({"out_dir": absolute_out_dir(config), **stats}))
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from refine.config import run_tokenizer
    from refine.data.inspect import inspect_data

    if args.documents < 0:
        raise ValueError(f"--documents must be >= 0 (0: one whole pass), got {args.documents}")
    config = load_config(args.config, args.set, defaults=DEMO_DEFAULTS)  # what `refine train` would read
    print(json.dumps(inspect_data(config, run_tokenizer(config), args.documents or None), indent=2))
    return 0


def _model_inspect(args: argparse.Namespace) -> int:
    from refine.models import inspect_model, load_model

    print(json.dumps(inspect_model(load_model(args.path)), indent=2))
    return 0


def _score(argv: list[str]) -> int:
    from refine.evaluation.score import main as score_main

    return score_main(argv)


def _eval(args: argparse.Namespace) -> int:
    from refine.evaluation.runner import main as eval_main

    return eval_main(args)


def _posttrain(args: argparse.Namespace) -> int:
    from refine.posttrain import main as posttrain_main

    return posttrain_main(args)


def _configs(args: argparse.Namespace) -> int:
    report = copy_examples(args.directory, overwrite=args.force)
    for path in report.already_shipped:
        print(f"refine: {path} is the shipped example itself (a checkout's configs/): left as it is",
              file=sys.stderr)
    for path in report.written:
        print(path)
    return 0


def _installed_version() -> str:
    """The installed distribution's version (pyproject.toml's), or a note when the code runs uninstalled."""
    try:
        return importlib.metadata.version("refine-rl")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refine", description="REFINE: next-sequence prediction RL for fast-weight LMs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (NTP or REFINE) from a config file")
    train.add_argument("config", nargs="?", default=None,
                       help="YAML config (default: the main job: NTP, then REFINE vs NTP, compared on NIAH / MQAR)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.hidden_size=256 (repeatable)")
    train.add_argument("--local", action="store_true", help="single-process loop (no Ray, no Redis)")
    train.add_argument("--ray-address", default=None, type=address("a local Ray"),
                       help="Ray cluster to run on (default: service.ray_address, RAY_ADDRESS, else a local Ray)")
    train.add_argument("--redis-url", default=None, type=address("an embedded Redis"),
                       help="Redis for the run's streams (default: service.redis_url, REFINE_REDIS_URL, "
                            "else an embedded server)")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    inspect = model_sub.add_parser("inspect", help="architecture, parameter count, recurrent state size")
    inspect.add_argument("path", help="checkpoint directory (config.json + safetensors)")
    inspect.set_defaults(func=_model_inspect)

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_inspect = data_sub.add_parser("inspect", help="what the run's data settings make of data.source: documents, "
                                                       "tokens, what is dropped or cut, lengths, steps per pass")
    data_inspect.add_argument("config", nargs="?", default=None,
                              help="YAML config (default: the main job's, as `refine train` without one)")
    data_inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="override a config value, e.g. --set data.source=docs.jsonl (repeatable)")
    data_inspect.add_argument("--documents", type=int, default=10_000, metavar="N",
                              help="read the first N documents (default 10000); 0: one whole pass")
    data_inspect.set_defaults(func=_data_inspect)

    evaluate = sub.add_parser("eval", help="generate answers on a task (greedy, or sampled: "
                                           "eval.answer_temperature), score them, write results JSON")
    evaluate.add_argument("--model", required=True, help="checkpoint directory")
    evaluate.add_argument("--task", required=True, choices=["niah", "mqar", "ruler-qa", "longbench"])
    evaluate.add_argument("--data", default=None, help="task file (ruler-qa, longbench); synthetic tasks generate their own")
    evaluate.add_argument("--ttt", action="store_true",
                          help="test-time REFINE on each prompt first (weights restored after each, unless "
                               "--ttt-accumulate)")
    evaluate.add_argument("--config", default=None, help="run config whose refine/optim sections drive --ttt (at optim.lr: the schedule is training's)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    evaluate.add_argument("--num-examples", type=int, default=None,
                          help="evaluate the first N examples (default: every row of --data; 20 for niah / mqar, "
                               "whose N x --length may not pass 67108864 tokens)")
    evaluate.add_argument("--length", type=int, default=None,
                          help="synthetic prompt length in tokens (niah, mqar; default 512), at most 131072: "
                               "RULER's longest")
    evaluate.add_argument("--ttt-steps", type=int, default=None,
                          help="REFINE updates on each prompt with --ttt (default 2, at most 1000), weights "
                               "restored after it")
    evaluate.add_argument("--ttt-accumulate", action="store_true",
                          help="with --ttt: keep the adapted weights and optimizer state from example to example")
    evaluate.add_argument("--ttt-batch", type=int, default=None, metavar="N",
                          help="with --ttt: adapt on N prompts at a time, as the paper's released scripts do (N = 8, "
                               "--set train.mini_batches=2): rollouts sampled once per batch, a REFINE update per "
                               "mini-batch of its prompts, then the batch's answers; weights and optimizer state "
                               "carry over from batch to batch")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="tokens per answer, at most 65536 (default: the row's max_gen_tokens, else "
                               "LongBench's budget for the dataset, else 32)")
    evaluate.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's, else bytes)")
    evaluate.add_argument("--output", default=None, help="results JSON path")
    evaluate.add_argument("--seed", type=int, default=1234,
                          help="seeds the synthetic tasks' prompts, sampled answers and --ttt's rollouts. With "
                               "--ttt the example at position i (0 first) draws from seed + i (batch i with "
                               "--ttt-batch); without, sampled answers draw from one generator in file order. So "
                               "removing or reordering rows changes the draws of the rows after them")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_eval)

    posttrain = sub.add_parser("posttrain", help="post-train on QA data: REFINE on each prompt + SFT on its answer")
    posttrain.add_argument("--data", required=True, help="task file: JSON lines, parquet or save_to_disk")
    posttrain.add_argument("--task", required=True, choices=["ruler-qa", "longbench"])
    posttrain.add_argument("--config", default=None,
                           help="YAML config, e.g. configs/posttrain.yaml (default: built-in defaults, hybrid reward)")
    posttrain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set train.init_from=DIR (repeatable)")
    posttrain.add_argument("--sft-coef", type=float, default=1.0, help="weight of the answer's SFT loss")
    posttrain.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest")
    posttrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    posttrain.set_defaults(func=_posttrain)

    configs = sub.add_parser("configs", help="copy the example configs that ship with the package (the ones README "
                                             "names) into a directory, listing the files written")
    configs.add_argument("directory", nargs="?", default=DEFAULT_DIR,
                         help=f"where to write them (default: ./{DEFAULT_DIR}, where README's commands look)")
    configs.add_argument("--force", action="store_true", help="overwrite files of the same names there")
    configs.set_defaults(func=_configs)

    # Listed for --help only: main() hands everything after "score" to refine.evaluation.score, which
    # parses its own options (argparse.REMAINDER would not pass on ones that start with "-").
    sub.add_parser("score", help="score predictions with a benchmark's metric (refine score -h)", add_help=False)
    return parser


def _reported_errors() -> tuple[type[BaseException], ...]:
    """Errors of bad input or an unusable setup: one line on stderr, exit code 2, no traceback. Service
    errors count only once services.failures was imported (a service run)."""
    # OSError: a path that cannot be read or written (missing, a directory, no permission); its message names it.
    errors: list[type[BaseException]] = [ConfigError, OSError, ValueError]
    failures = sys.modules.get("services.failures")
    if failures is not None:
        errors.append(failures.ServiceError)
    redis_server = sys.modules.get("services.redis_server")
    if redis_server is not None:
        errors.append(redis_server.RedisUnavailableError)  # a --redis-url nobody answers at
    return tuple(errors)


def _check_arguments_are_text(argv: list[str]) -> None:
    """Refuse an argument that is not valid UTF-8 (a file name in another encoding): every command records its
    paths and settings in UTF-8 files (config.yaml, results JSON), which would fail only after the work, and after a
    fresh run had cleared the earlier run's checkpoints."""
    for argument in argv:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ValueError(f"argument '{shown}' is not valid UTF-8 (a file name in another encoding?): the run "
                             f"records its paths in UTF-8 files; rename it") from None


def _stdout_went_away() -> bool:
    """Whether stdout is a pipe whose reader is gone (a BrokenPipeError may also come from a socket): poll says so
    with POLLERR. If so, stdout is pointed at os.devnull, or the interpreter's last flush fails once more."""
    try:
        descriptor = sys.stdout.fileno()
        poller = select.poll()
        poller.register(descriptor, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no such stdout (a notebook's), or no poll on this system
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), descriptor)
    return gone


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None if argv[:1] == ["score"] else build_parser().parse_args(argv)
    tune_allocator()
    # SIGTERM ends every command as Ctrl-C does; a run's steps take both more gently (refine.loop.stop_requests,
    # the service's orchestrator).
    with sigterm_as_ctrl_c():
        try:
            _check_arguments_are_text(argv)
            return _score(argv[1:]) if args is None else args.func(args)
        except KeyboardInterrupt:  # Ctrl-C: what was running already said how it stopped; no traceback
            print("refine: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            if not _stdout_went_away():
                raise
            return 141  # as a shell reports a command its reader left (`refine data inspect ... | head`): no error
        except Exception as err:
            if not isinstance(err, _reported_errors()):
                raise
            print(f"refine: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(command_exit(main()))
