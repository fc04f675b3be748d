"""Rollout tokens per second: snapshot engine vs re-prefill generation, same model, prefixes and run.

Two re-prefill baselines: "reprefill" runs every prefix at its own length (the least work the
pattern can do); "reprefill_padded" pads every prefix to the document's width, the work of the
paper code's batch layout: embeddings, norms, MLPs and lm_head run over the padding, the token mixers
(projections, short convolutions, delta-rule kernel) over the real tokens only, as fla's DeltaNet
layer unpads its input by the attention mask. Both prefill the logits of the last prefix token only,
as a generate call does.

Each row also has the spread of the rounds per engine (`min_seconds`, `iqr_seconds`, `round_seconds`;
`seconds` are the medians), what its ratios are ("ratio_estimate": medians of per-round ratios), the
model's size and the machine.

    python benchmarks/rollout.py [--lengths 1024 4096 16384] [--samples 1 4] [--repeats 3] [--threads 2]
                                 [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also when imported by path

from common import RATIO_ESTIMATE, device_arg, machine_info, spread  # noqa: E402
from refine.cli import int_at_least, positive_int  # noqa: E402
from refine.algorithm.rollout import choose_positions, reprefill_rollouts, snapshot_rollouts  # noqa: E402
from refine.algorithm.selection import min_document_length  # noqa: E402
from refine.config import DTYPES, RefineConfig  # noqa: E402
from refine.models import build_model  # noqa: E402
from refine.runtime import StageTimes, tune_allocator  # noqa: E402


# c = 8 chunks and k = 5-token rollouts, as this benchmark fixes them, need documents at least this long.
DOCUMENT_LENGTH = int_at_least(min_document_length(8, 5, RefineConfig().margin),
                               " (c = 8 chunks of k = 5-token rollouts, with the default margin)")
# The tiny DeltaNet the goals are stated for, as step.py's defaults; its rows report it under "model".
MODEL_SIZE = {"hidden_size": 128, "layers": 2, "heads": 2}


def run(length: int, samples: int, model, repeats: int, device_as_given: str) -> dict:
    device = model.device
    cfg = RefineConfig(num_chunks=8, rollout_len=5, num_samples=samples)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    lengths = torch.tensor([length], device=device)

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    with torch.no_grad():
        positions = choose_positions(model(ids, output_state=False).logits, lengths, cfg, seeded(0))
    engines = {
        "snapshot": lambda: snapshot_rollouts(model, ids, lengths, cfg, seeded(1), positions),
        "reprefill": lambda: reprefill_rollouts(model, ids, lengths, cfg, positions, seeded(1)),
        "reprefill_padded": lambda: reprefill_rollouts(model, ids, lengths, cfg, positions, seeded(1), padded=True),
    }
    tokens = engines["snapshot"]().tokens.numel()  # also the warm-up
    for name in ("reprefill", "reprefill_padded"):
        engines[name]()
    timings: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):  # the engines take turns, so a noisy neighbour slows both alike
        times = StageTimes(device)
        for name, fn in engines.items():
            with times.stage(name):
                fn()
            timings[name].append(times.seconds[name])
    seconds = {name: statistics.median(values) for name, values in timings.items()}

    def ratio(baseline: str) -> float:  # median of per-round ratios: a round's engines share its noise
        return round(statistics.median(b / s for b, s in zip(timings[baseline], timings["snapshot"])), 2)

    return {
        "benchmark": "rollout", "context_length": length, "rollout_tokens": tokens, "model": MODEL_SIZE,
        "num_chunks": 8, "rollout_len": 5, "num_samples": samples, "device": device_as_given,
        "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "repeats": repeats,
        "tokens_per_second": {k: round(tokens / v, 1) for k, v in seconds.items()},
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        **spread(timings),
        "ratio_estimate": RATIO_ESTIMATE,
        "snapshot_over_reprefill": ratio("reprefill"),
        "snapshot_over_reprefill_padded": ratio("reprefill_padded"),
        "reprefill_padded_layout": "prefixes padded to the document width; token mixers over the real tokens only",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=DOCUMENT_LENGTH, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--samples", type=positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    tune_allocator()  # as every refine process does
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=MODEL_SIZE["hidden_size"],
                             num_hidden_layers=MODEL_SIZE["layers"], num_heads=MODEL_SIZE["heads"],
                             intermediate_size=2 * MODEL_SIZE["hidden_size"], tie_word_embeddings=True),
                        dtype=DTYPES[args.dtype]).to(args.device)
    machine = machine_info(args.device)
    for length in args.lengths:
        for samples in args.samples:
            print(json.dumps({**run(length, samples, model, args.repeats, args.device), **machine}), flush=True)


if __name__ == "__main__":
    main()
