"""The `refine` command line."""

from __future__ import annotations

import argparse
import json
import sys

from refine.config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    from refine.loop import train

    config = load_config(args.config, args.set)
    stats = train(config, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({"out_dir": config.train.out_dir, **stats}))
    return 0


def _model_inspect(args: argparse.Namespace) -> int:
    from refine.models import inspect_model, load_model

    print(json.dumps(inspect_model(load_model(args.path)), indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    from refine.evaluation.score import main as score_main

    return score_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refine", description="REFINE: next-sequence prediction RL for fast-weight LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (NTP or REFINE) from a config file")
    train.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.hidden_size=256 (repeatable)")
    train.add_argument("--local", action="store_true", help="single-process loop (no Ray, no Redis)")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    inspect = model_sub.add_parser("inspect", help="architecture, parameter count, recurrent state size")
    inspect.add_argument("path", help="checkpoint directory (config.json + safetensors)")
    inspect.set_defaults(func=_model_inspect)

    score = sub.add_parser("score", help="score predictions with a benchmark's metric", add_help=False)
    score.add_argument("rest", nargs=argparse.REMAINDER)
    score.set_defaults(func=_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"refine: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
