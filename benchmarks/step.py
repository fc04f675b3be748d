"""Seconds per optimizer step: NTP only, REFINE one-pass, fused and reference, same model and batch.

Prints one JSON object per (length, n) with the medians, the ratios and, per stage, where the time of
the NTP, one-pass and fused steps goes (`*_breakdown_seconds`: a fused step's forward, backward and
optimizer against an NTP step's show what its rollouts add to them; on a GPU every stage boundary
waits for the device, a few more waits in a fused step than in an NTP step). "document_pass_over_ntp"
is a plain no-grad forward over the same documents against the NTP step: the one-pass step runs such a
pass for its rollouts, so 1 + that ratio is its floor.
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

import torch

from refine.algorithm.losses import ntp_loss
from refine.algorithm.rollout import choose_positions, reprefill_rollouts, snapshot_rollouts
from refine.algorithm.update import advantages_for, fused_refine_step, refine_loss, score_rollouts
from refine.config import DTYPES, RefineConfig
from refine.models import build_model
from refine.runtime import StageTimes, timed_stage, tune_allocator


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

    def timed(fn) -> float:
        times = StageTimes(device)
        with times.stage("step"):
            fn()
        return times.seconds["step"]

    # Seconds per stage of every run of a mode, for the breakdowns.
    stages: dict[str, list[dict[str, float]]] = {"ntp": [], "onepass": [], "fused": []}

    def step(loss, times: StageTimes | None = None):
        optimizer.zero_grad()
        with timed_stage(times, "backward"):
            loss.backward()
        with timed_stage(times, "optimizer"):
            optimizer.step()

    def ntp():
        times = StageTimes(device)
        with times.stage("forward"):
            loss = ntp_loss(model(ids, lengths=lengths, output_state=False).logits, ids, lengths)
        step(loss, times)
        stages["ntp"].append(times.seconds)

    def onepass():
        times = StageTimes(device)
        with times.stage("rollout_pass"):
            rollouts = snapshot_rollouts(model, ids, lengths, cfg, gen)
            rollouts.rewards = score_rollouts(rollouts, cfg)
        with times.stage("update_forward"):
            result = refine_loss("onepass", model, ids, lengths, rollouts,
                                 advantages_for(rollouts.rewards, rollouts, cfg), cfg)
        step(result.loss, times)
        stages["onepass"].append(times.seconds)

    def document_pass():
        with torch.inference_mode():
            model(ids, lengths=lengths, output_state=False)

    def fused():
        times = StageTimes(device)
        result, _ = fused_refine_step(model, ids, lengths, cfg, gen, times=times)
        step(result.loss, times)
        stages["fused"].append(times.seconds)

    def reference():
        with torch.no_grad():
            positions = choose_positions(model(ids, lengths=lengths, output_state=False).logits, lengths, cfg, gen)
        rollouts = reprefill_rollouts(model, ids, lengths, cfg, positions, gen)
        rollouts.rewards = score_rollouts(rollouts, cfg)
        step(refine_loss("reference", model, ids, lengths, rollouts, advantages_for(rollouts.rewards, rollouts, cfg),
                         cfg).loss)

    # Modes take turns in every round, so a noisy neighbour slows all of them alike. Each timed step
    # follows an untimed step of its own mode, as in a training loop: a step right after another
    # mode's runs on memory and caches laid out for that mode, which moved fused/NTP by up to 0.07.
    modes = (("ntp", ntp), ("onepass", onepass), ("fused", fused), ("reference", reference),
             ("document_pass", document_pass))
    timings: dict[str, list[float]] = {name: [] for name, _ in modes}
    for _ in range(repeats):
        for name, fn in modes:
            fn()
            timings[name].append(timed(fn))
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
        "onepass_over_ntp": round(ratio("onepass", "ntp"), 3),
        "fused_over_ntp": round(ratio("fused", "ntp"), 3),
        "document_pass_over_ntp": round(ratio("document_pass", "ntp"), 3),
        "reference_over_onepass": round(ratio("reference", "onepass"), 2),
        **{f"{mode}_breakdown_seconds": breakdown(runs) for mode, runs in stages.items()},
    }


def breakdown(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds of every stage over the runs of one mode."""
    return {name: round(statistics.median(run[name] for run in runs), 4) for name in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    size = {"hidden_size": args.hidden_size, "layers": args.layers, "heads": args.heads}
    tune_allocator()  # as every refine process does
    torch.set_num_threads(args.threads)
    for length in args.lengths:
        for samples in args.samples:
            print(json.dumps(run(length, samples, args.repeats, args.batch, size, args.device, args.dtype)),
                  flush=True)


if __name__ == "__main__":
    main()
