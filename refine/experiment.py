"""The main job: does next-sequence prediction help a fast-weight model beyond next-token prediction?

1. pre-train a tiny model with NTP;
2. continue two copies for the same number of steps: one with REFINE, one with NTP only;
3. evaluate all three on held-out documents (NTP loss) and held-out synthetic NIAH and MQAR;
4. print the comparison table and write it (JSON + Markdown) with PNG curves into the run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch
from pydantic import ValidationError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refine.algorithm.rewards import check_run_reward  # noqa: E402
from refine.checkpoints import checkpoint_step, clear_checkpoints, latest_checkpoint  # noqa: E402
from refine.config import RunConfig, run_tokenizer, validate_config  # noqa: E402
from refine.data.stream import recall_corpus_config  # noqa: E402
from refine.data.synthetic import (  # noqa: E402
    LengthTooShortError, NiahConfig, generate_niah, generate_recall_documents, mqar_for_length,
)
from refine.evaluation.answering import evaluate  # noqa: E402
from refine.evaluation.heldout import heldout_ntp_loss  # noqa: E402
from refine.models import load_model  # noqa: E402
from refine.plots import read_metrics  # noqa: E402
from refine.runtime import callers_torch_state_kept, note  # noqa: E402
from refine.step import check_mini_batches  # noqa: E402
from refine.tokenizer import HFTokenizer, Tokenizer  # noqa: E402

Trainer = Callable[[RunConfig], dict]


# The main job's stages (each a run directory under train.out_dir, the branches after "pretrain") and reports.
STAGES = ("pretrain", "refine", "ntp")
REPORTS = ("comparison.json", "comparison.md", "comparison.png")


def stage_config(config: RunConfig, name: str, mode: str, steps: int, lr: float, init_from: str | None,
                 tokenizer: Tokenizer) -> RunConfig:
    tree = config.model_dump(mode="json")
    tree["demo"] = None
    # Every stage, and the evaluation, use the comparison's tokenizer (a stage's own fallback could differ).
    tree["tokenizer"] = str(tokenizer.file) if isinstance(tokenizer, HFTokenizer) else None
    tree["train"].update(mode=mode, steps=steps, out_dir=str(Path(config.train.out_dir) / name), init_from=init_from)
    tree["optim"]["lr"] = lr
    return validate_config(tree)


def demo_heldout_documents(tokenizer: Tokenizer, config: RunConfig) -> list[list[int]]:
    """demo.heldout_documents recall documents of data.seq_len tokens with their BOS, as the training corpus makes
    them, from a seed the training corpus never uses."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    corpus = recall_corpus_config(config.data.seq_len - len(bos), config.data.seq_len,
                                  seed=config.train.seed + 10_000)
    docs = generate_recall_documents(corpus, tokenizer, config.demo.heldout_documents)
    return [(bos + tokenizer.encode(d.text))[: config.data.seq_len] for d in docs]


def eval_examples(task: str, tokenizer: Tokenizer, config: RunConfig) -> list:
    seed = config.train.seed + 20_000
    if task == "niah":
        return generate_niah(NiahConfig(variant="single", length=config.demo.eval_length, seed=seed), tokenizer,
                             config.demo.eval_examples)
    return mqar_for_length(config.demo.eval_length, tokenizer, config.demo.eval_examples, seed)


def eval_sets(tokenizer: Tokenizer, config: RunConfig) -> dict[str, list]:
    """Every evaluation task's examples, built once before anything trains and shared by every model's evaluation:
    a demo.eval_length too short for a task's prompt fails now, naming the setting, instead of after every stage
    has trained."""
    sets = {}
    for task in config.demo.eval_tasks:
        try:
            sets[task] = eval_examples(task, tokenizer, config)
        except LengthTooShortError as error:
            raise ValueError(f"demo.eval_length={config.demo.eval_length} is too short for the {task} evaluation "
                             f"set: its prompt without filler takes up to {error.needed} tokens") from None
    return sets


def heldout_set(tokenizer: Tokenizer, config: RunConfig) -> list[list[int]]:
    """demo_heldout_documents, built before anything trains: a data.seq_len too short for them fails now, naming
    the setting, instead of after every stage has trained."""
    try:
        return demo_heldout_documents(tokenizer, config)
    except ValidationError as error:
        reason = error.errors()[0]["msg"]
    except ValueError as error:
        reason = str(error)
    raise ValueError(f"data.seq_len={config.data.seq_len} is too short for the main job's held-out recall "
                     f"documents ({reason})")


def evaluate_model(path: Path, tokenizer: Tokenizer, config: RunConfig, sets: dict[str, list],
                   documents: list[list[int]]) -> dict[str, float]:
    with callers_torch_state_kept("cpu"):  # the stages' train.threads, as they trained (train() leaves its own)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        model = load_model(path).eval()
        row = {"heldout_ntp_loss": round(heldout_ntp_loss(model, documents, len(documents), tokenizer.pad_id or 0),
                                         4)}
        for task, examples in sets.items():
            result = evaluate(model, tokenizer, examples, task, ttt=False,
                              run_config=config, ttt_steps=0, max_new_tokens=None, progress=False)
            row[task] = result["summary"]["score"]
    return row


def plot_branches(runs: dict[str, Path], out_dir: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, run in runs.items():
        rows = read_metrics(run / "metrics.jsonl")
        axes[0].plot([r["step"] for r in rows], [r["ntp_loss"] for r in rows], label=name)
        rewards = [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]
        if rewards:
            axes[1].plot([s for s, _ in rewards], [v for _, v in rewards], label=name)
    axes[0].set_title("NTP loss (training batches)")
    axes[1].set_title("NSP reward (REFINE branch)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_table(rows: dict[str, dict], tasks: list[str]) -> str:
    header = "| model | steps | held-out NTP loss | " + " | ".join(t.upper() for t in tasks) + " |"
    lines = [header, "|" + " --- |" * (3 + len(tasks))]
    for name, row in rows.items():
        cells = [name, str(row["steps"]), f"{row['heldout_ntp_loss']:.4f}"] + [f"{row[t]:.1f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def refine_stage_mode(config: RunConfig) -> str:
    """train.mode of the REFINE branch: the config's, fused where the config says ntp."""
    return config.train.mode if config.train.mode != "ntp" else "fused"


def check_refine_branch(config: RunConfig, tokenizer: Tokenizer) -> None:
    """Before the NTP pre-training (minutes): the REFINE branch's own config is valid. With train.mode=ntp the
    config's REFINE checks (margins, mini-batches) were skipped at load, but the branch still runs, fused."""
    mode = refine_stage_mode(config)
    try:
        check_mini_batches(stage_config(config, "refine", mode, config.demo.branch_steps, config.demo.branch_lr, None,
                                        tokenizer))
    except ValueError as error:
        given = "" if mode == config.train.mode else f", as train.mode={config.train.mode} makes it"
        raise ValueError(f"the main job's REFINE branch (train.mode={mode}{given}) cannot run: {error}") from None


def start_over(out_dir: Path) -> str | None:
    """A fresh main job in `out_dir` (no --resume) removes the earlier run's stage checkpoints and comparison:
    else a --resume after this run stopped early would take a branch from the earlier run, trained from another
    pre-trained model. Returns what it says about them, if anything was there."""
    cleared = [stage for stage in STAGES if (out_dir / stage).is_dir() and clear_checkpoints(out_dir / stage)]
    reports = [name for name in REPORTS if (out_dir / name).exists()]
    for name in reports:
        (out_dir / name).unlink()
    if not cleared and not reports:
        return None
    removed = ([f"checkpoints of {', '.join(cleared)}"] if cleared else []) + ([", ".join(reports)] if reports else [])
    return f"a fresh main job in {out_dir}: removed the earlier run's {' and '.join(removed)} (--resume continues a run)"


def check_branches_descend(out_dir: Path, pretrain_steps: int) -> None:
    """Refuse a --resume that would train the pre-trained model further under branches already started from it."""
    pretrained = latest_checkpoint(out_dir / "pretrain")
    step = checkpoint_step(pretrained) if pretrained.exists() else 0
    branched = [stage for stage in STAGES[1:] if latest_checkpoint(out_dir / stage).exists()]
    if branched and step < pretrain_steps:
        raise ValueError(f"--resume: the {' and '.join(branched)} branch in {out_dir} started from the pre-trained "
                         f"model at step {step}, which demo.pretrain_steps={pretrain_steps} would train further: "
                         f"resume with demo.pretrain_steps={step}, or start a fresh run (without --resume)")


def run_comparison(config: RunConfig, trainer: Trainer, decodes_text: bool = False, resume: bool = False) -> dict:
    """Run the three stages with `trainer` (local loop or the service), evaluate, and report. `resume`: the stages
    go on from their checkpoints (the trainer resumes them); else the earlier run's are removed first.

    `decodes_text`: the trainer runs the REFINE branch with reward replicas that decode text (the
    service with service.mode='disaggregated'); else a text reward is refused before anything trains.
    """
    if config.demo is None:
        raise ValueError("run_comparison needs the demo section of the config")
    # Before the NTP pre-training (minutes): a reward the REFINE branch cannot score fails now.
    check_run_reward(config.refine.reward, config.refine.reward_modules, decodes_text=decodes_text)
    started = time.perf_counter()
    out_dir = Path(config.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = config.demo
    tokenizer = run_tokenizer(config)
    sets = eval_sets(tokenizer, config)
    heldout = heldout_set(tokenizer, config)
    check_refine_branch(config, tokenizer)
    if resume:
        check_branches_descend(out_dir, demo.pretrain_steps)
    else:
        message = start_over(out_dir)
        if message is not None:
            note(f"refine: {message}")

    pretrain = stage_config(config, "pretrain", "ntp", demo.pretrain_steps, demo.pretrain_lr, None, tokenizer)
    trainer(pretrain)
    start_model = str(Path(pretrain.train.out_dir) / "checkpoints/latest/model")
    refine_mode = refine_stage_mode(config)
    branches = {
        "+ REFINE": stage_config(config, "refine", refine_mode, demo.branch_steps, demo.branch_lr, start_model,
                                 tokenizer),
        "+ NTP": stage_config(config, "ntp", "ntp", demo.branch_steps, demo.branch_lr, start_model, tokenizer),
    }
    for branch in branches.values():
        trainer(branch)

    # The steps of the checkpoints evaluated (a resume with fewer demo.*_steps than a stage took trains nothing).
    pretrained = checkpoint_step(Path(start_model).parent)
    rows = {"NTP pre-training": {"steps": pretrained, **evaluate_model(Path(start_model), tokenizer, config, sets,
                                                                      heldout)}}
    for name, branch in branches.items():
        model_dir = Path(branch.train.out_dir) / "checkpoints/latest/model"
        rows[name] = {"steps": pretrained + checkpoint_step(model_dir.parent),
                      **evaluate_model(model_dir, tokenizer, config, sets, heldout)}
    table = markdown_table(rows, list(demo.eval_tasks))
    plot_branches({name: Path(b.train.out_dir) for name, b in branches.items()}, out_dir)
    report = {"rows": rows, "wall_seconds": round(time.perf_counter() - started, 1), "table": table}
    (out_dir / "comparison.json").write_text(json.dumps(report, indent=2))
    (out_dir / "comparison.md").write_text(table + "\n")
    print(table)
    return report
