"""Seconds per optimizer step: NTP only, REFINE one-pass, fused and reference, same model and batch.

Prints one JSON object per (length, n) with the medians, the spread of the rounds (`min_seconds`,
`iqr_seconds`, `round_seconds`), the ratios (each the median of per-round ratios, "ratio_estimate"),
the machine and, per stage, where the time of the NTP, one-pass and fused steps goes
(`*_breakdown_seconds`: the stages of the mode's median step, zero_grad included, and "unstaged", that
step's time outside every stage, so they add up to the mode's `median_seconds`; with an even
--repeats, the mean of the two middle steps. A fused step's forward, backward and optimizer against an
NTP step's show what its rollouts add to them; on a GPU every stage boundary waits for the device, a
few more waits in a fused step than in an NTP step). "document_pass_over_ntp" is the one-pass step's
no-grad document pass (exactly the pass `snapshot_rollouts` runs) against the NTP step, so 1 + that
ratio is the one-pass step's floor.

The reference step is the paper's method done literally (re-prefill each prefix, recompute the
log-probs, a separate forward per prefix in the update; entropies and ground-truth hidden states from
one document pass), but every prefix runs at its own length ("reference_prefix_layout"): the least
work that pattern can do. The paper's code left-pads every prefix to the document's width, which costs
more, so "reference_over_onepass" understates the paper's cost (benchmarks/rollout.py times the
padded layout's rollouts).
    python benchmarks/step.py [--lengths 1024 4096] [--samples 1 4] [--repeats 9] [--batch 1] [--threads 2]
                              [--hidden-size 128] [--layers 2] [--heads 2] [--device cpu] [--dtype float32]

The default model is the tiny DeltaNet the goals are stated for; --hidden-size/--layers/--heads show
how the ratios move as per-operation overhead shrinks next to the arithmetic. On --device cuda the
final-state forwards (NTP, re-prefilled prefixes) run fla's Triton kernels where installed, while
the one-pass and fused forwards, which need states at positions, run our torch chunk kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also when imported by path

from common import RATIO_ESTIMATE, device_arg, machine_info, spread  # noqa: E402
from refine.cli import int_at_least, positive_int  # noqa: E402
from refine.algorithm.losses import ntp_loss  # noqa: E402
from refine.algorithm.rollout import choose_positions, reprefill_rollouts, snapshot_rollouts  # noqa: E402
from refine.algorithm.update import advantages_for, fused_refine_step, refine_loss, score_rollouts  # noqa: E402
from refine.algorithm.selection import min_document_length  # noqa: E402
from refine.config import DTYPES, RefineConfig  # noqa: E402
from refine.models import build_model  # noqa: E402
from refine.runtime import StageTimes, timed_stage, tune_allocator  # noqa: E402


# c = 8 chunks and k = 5-token rollouts, as this benchmark fixes them, need documents at least this long.
DOCUMENT_LENGTH = int_at_least(min_document_length(8, 5, RefineConfig().margin),
                               " (c = 8 chunks of k = 5-token rollouts, with the default margin)")


def run(length: int, samples: int, repeats: int, batch: int, size: dict[str, int], device: str, dtype: str) -> dict:
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=size["hidden_size"],
                             num_hidden_layers=size["layers"], num_heads=size["heads"],
                             intermediate_size=2 * size["hidden_size"], tie_word_embeddings=True),
                        dtype=DTYPES[dtype]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cfg = RefineConfig(num_chunks=8, rollout_len=5, num_samples=samples)
    ids = torch.randint(0, 256, (batch, length), device=device)
    lengths = torch.full((batch,), length, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(loss, times: StageTimes | None):
        with timed_stage(times, "zero_grad"):
            optimizer.zero_grad()
        with timed_stage(times, "backward"):
            loss.backward()
        with timed_stage(times, "optimizer"):
            optimizer.step()

    def ntp(times: StageTimes | None):
        with timed_stage(times, "forward"):
            loss = ntp_loss(model(ids, lengths=lengths, output_state=False).logits, ids, lengths)
        step(loss, times)

    def onepass(times: StageTimes | None):
        with timed_stage(times, "rollout_pass"):
            rollouts = snapshot_rollouts(model, ids, lengths, cfg, gen)
            rollouts.rewards = score_rollouts(rollouts, cfg)
        with timed_stage(times, "update_forward"):
            result = refine_loss("onepass", model, ids, lengths, rollouts,
                                 advantages_for(rollouts.rewards, rollouts, cfg), cfg)
        step(result.loss, times)

    def document_pass(times: StageTimes | None):
        with torch.inference_mode():  # the very pass snapshot_rollouts runs (defer_states picks its kernel)
            model(ids, lengths=lengths, output_state=False, defer_states=True)

    def fused(times: StageTimes | None):
        result, _ = fused_refine_step(model, ids, lengths, cfg, gen, times=times)
        step(result.loss, times)

    def reference(times: StageTimes | None):
        # One document pass gives both the entropies that choose the positions and the ground truth's
        # hidden states, as in the paper's code.
        with torch.inference_mode():
            document = model(ids, lengths=lengths, output_state=False)
            positions = choose_positions(document.logits, lengths, cfg, gen)
        rollouts = reprefill_rollouts(model, ids, lengths, cfg, positions, gen,
                                      document_hidden=document.hidden_states)
        rollouts.rewards = score_rollouts(rollouts, cfg)
        step(refine_loss("reference", model, ids, lengths, rollouts, advantages_for(rollouts.rewards, rollouts, cfg),
                         cfg).loss, None)

    modes = {"ntp": ntp, "onepass": onepass, "fused": fused, "reference": reference,
             "document_pass": document_pass}
    timings, stages = time_rounds(modes, repeats, device)
    results = {name: statistics.median(values) for name, values in timings.items()}
    # Every round times all modes back to back, so a per-round ratio cancels the slow drifts of a
    # shared machine; the median over rounds is the headline ratio.
    def ratio(numerator: str, denominator: str) -> float:
        return statistics.median(a / b for a, b in zip(timings[numerator], timings[denominator]))

    return {
        "benchmark": "step", "length": length, "batch": batch, "model": size, "num_chunks": 8, "rollout_len": 5,
        "num_samples": samples, "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
        "repeats": repeats,
        "median_seconds": {k: round(v, 4) for k, v in results.items()},
        **spread(timings),
        "ratio_estimate": RATIO_ESTIMATE,
        "onepass_over_ntp": round(ratio("onepass", "ntp"), 3),
        "fused_over_ntp": round(ratio("fused", "ntp"), 3),
        "document_pass_over_ntp": round(ratio("document_pass", "ntp"), 3),
        "reference_over_onepass": round(ratio("reference", "onepass"), 2),
        "reference_prefix_layout": "own_length",  # each prefix at its own length, not padded as the paper's
        **{f"{mode}_breakdown_seconds": breakdown(timings[mode], stages[mode])
           for mode in ("ntp", "onepass", "fused")},
    }


Mode = Callable[[StageTimes | None], None]


def time_rounds(modes: dict[str, Mode], repeats: int,
                device: str) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """Seconds of every timed step of every mode, and the seconds per stage of those same steps.

    Modes take turns in every round, so a noisy neighbour slows all of them alike. Each timed step
    follows an untimed step of its own mode (called with times=None: no stages recorded), as in a
    training loop: a step right after another mode's runs on memory and caches laid out for that
    mode, which moved fused/NTP by up to 0.07.
    """
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            fn(None)
            total, parts = StageTimes(device), StageTimes(device)
            with total.stage("step"):
                fn(parts)
            seconds[name].append(total.seconds["step"])
            stages[name].append(parts.seconds)
    return seconds, stages


def median_rounds(seconds: list[float]) -> list[int]:
    """The rounds whose step is the median step: the middle one, or the middle two for an even count."""
    order = sorted(range(len(seconds)), key=seconds.__getitem__)
    middle = len(order) // 2
    return order[middle:middle + 1] if len(order) % 2 else order[middle - 1:middle + 1]


def breakdown(seconds: list[float], runs: list[dict[str, float]]) -> dict[str, float]:
    """Seconds of every stage of one mode's median step (the mean of the middle two for an even count), and
    "unstaged": that step's seconds outside every stage (argument checks, Python between stages). They add up
    to the mode's median seconds, where per-stage medians over rounds need not: under load the slow round of
    one stage is not the slow round of another."""
    rounds = median_rounds(seconds)
    stages = {name: statistics.fmean(runs[i][name] for i in rounds) for name in runs[rounds[0]]}
    stages["unstaged"] = statistics.fmean(seconds[i] for i in rounds) - sum(stages.values())
    return {name: round(value, 4) for name, value in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=DOCUMENT_LENGTH, nargs="+", default=[1024, 4096])
    parser.add_argument("--samples", type=positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--hidden-size", type=positive_int, default=128)
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    if args.hidden_size % args.heads:
        parser.error(f"--heads {args.heads} must divide --hidden-size {args.hidden_size}")
    size = {"hidden_size": args.hidden_size, "layers": args.layers, "heads": args.heads}
    tune_allocator()  # as every refine process does
    torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    for length in args.lengths:
        for samples in args.samples:
            row = run(length, samples, args.repeats, args.batch, size, args.device, args.dtype)
            print(json.dumps({**row, **machine}), flush=True)


if __name__ == "__main__":
    main()
