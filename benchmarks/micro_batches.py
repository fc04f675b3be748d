"""Gradient accumulation (`train.micro_batches`): peak memory and seconds of a one-pass REFINE step.

The same model, batch and rollouts, an optimizer step with the update forward and backward run in 1, 2, 4 ...
slices of the batch. Prints one JSON object per micro-batch count, each measured in a fresh process:
`saved_for_backward_peak_bytes`, the most activation memory autograd held at once over the first update (what
micro-batches divide), and its ratio to the first count's; `peak_memory_bytes`, on CUDA the peak of torch's
allocator over that update, on CPU the growth of the process's peak resident memory (ru_maxrss) over it, which
only counts what goes past the peak the no-grad rollout pass set before, and what the allocator kept from it
(`process_peak_rss_bytes`: the whole process's; the rollout pass runs on the whole batch whatever the count).
Then the median seconds of `--repeats` warm updates, and the first update's loss and gradient norm, equal
across counts to rounding.

    python benchmarks/micro_batches.py [--length 4096] [--batch 4] [--micro-batches 1 2 4] [--repeats 3]
                                       [--threads 2] [--hidden-size 128] [--layers 2] [--heads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also when imported by path

from common import device_arg  # noqa: E402
from refine.cli import positive_int  # noqa: E402
from refine.algorithm.rollout import snapshot_rollouts  # noqa: E402
from refine.algorithm.update import score_rollouts  # noqa: E402
from refine.config import RunConfig, load_config  # noqa: E402
from refine.config_parsing import ConfigError  # noqa: E402
from refine.models import build_model  # noqa: E402
from refine.runtime import sigterm_as_ctrl_c, tune_allocator  # noqa: E402
from refine.step import make_optimizer, rollout_batch_update  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class SavedForBackward:
    """The bytes of the tensors autograd keeps for backward (activations: parameters excluded), counted as they
    are saved by a forward and released as the backward reads them; `peak` is the most held at once. Unlike a
    process's resident memory it does not depend on what the allocator keeps for reuse. `parameters`: the
    storage addresses of the model's parameters, whose memory is no activation's."""

    def __init__(self, parameters: set[int]) -> None:
        self.parameters = parameters
        self.held: dict[int, tuple[int, int]] = {}  # storage address -> (tensors saved from it, its bytes)
        self.current = self.peak = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        # By storage, not by tensor: a layer saves views of its parameters too (nn.Linear saves weight.t()).
        if storage.data_ptr() not in self.parameters:
            count, size = self.held.get(storage.data_ptr(), (0, storage.nbytes()))
            if count == 0:
                self.current += size
                self.peak = max(self.peak, self.current)
            self.held[storage.data_ptr()] = (count + 1, size)
        return tensor

    def unpack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key in self.held:
            count, size = self.held[key]
            if count == 1:
                del self.held[key]
                self.current -= size
            else:
                self.held[key] = (count - 1, size)
        return tensor


def run_config(args: argparse.Namespace, micro_batches: int) -> RunConfig:
    return load_config(None, [
        "train.mode=onepass", f"train.batch_size={args.batch}", f"train.micro_batches={micro_batches}",
        f"data.seq_len={args.length}", "refine.num_chunks=8", "refine.rollout_len=5", f"train.device={args.device}",
    ])


def measure(args: argparse.Namespace, micro_batches: int) -> dict:
    """One step in this process: the seconds and peak memory of the update with `micro_batches` slices."""
    tune_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    config = run_config(args, micro_batches)
    model = build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=args.hidden_size,
                             num_hidden_layers=args.layers, num_heads=args.heads,
                             intermediate_size=2 * args.hidden_size, tie_word_embeddings=True)).to(device)
    optimizer = make_optimizer(model, config.optim)
    ids = torch.randint(0, 256, (args.batch, args.length), device=device)
    lengths = torch.full((args.batch,), args.length, device=device)
    rollouts = snapshot_rollouts(model, ids, lengths, config.refine, torch.Generator(device=device).manual_seed(0))
    rollouts.rewards = score_rollouts(rollouts, config.refine)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_bytes()
    saved = SavedForBackward({parameter.untyped_storage().data_ptr() for parameter in model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        outcome = rollout_batch_update("onepass", model, optimizer, ids, lengths, rollouts, config)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        measured = "cuda_max_memory_allocated"
    else:
        peak = peak_rss_bytes() - before
        measured = "ru_maxrss_growth"
    seconds = []
    for _ in range(args.repeats):  # warm steps, on the memory the first one took
        started = time.perf_counter()
        rollout_batch_update("onepass", model, optimizer, ids, lengths, rollouts, config)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return {"benchmark": "micro_batches", "micro_batches": micro_batches, "batch": args.batch,
            "context_length": args.length, "device": device,
            "median_update_seconds": round(statistics.median(seconds), 4),
            "saved_for_backward_peak_bytes": saved.peak, "peak_memory_bytes": peak, "memory_measured_as": measured,
            "process_peak_rss_bytes": peak_rss_bytes(),
            "first_step_loss": outcome.stats["loss"], "first_step_grad_norm": outcome.stats["grad_norm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--micro-batches", type=positive_int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3, help="warm update steps timed after the measured one")
    parser.add_argument("--hidden-size", type=positive_int, default=128)
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--device", default="cpu", type=device_arg)
    parser.add_argument("--one", type=positive_int, help=argparse.SUPPRESS)  # the child process: measure this count
    args = parser.parse_args()
    if args.hidden_size % args.heads:  # the model config refuses it, in the child, with a whole traceback
        parser.error(f"--heads {args.heads} must divide --hidden-size {args.hidden_size}")
    for count in args.micro_batches:  # settings the run config refuses: one line, before any process starts
        try:
            run_config(args, count)
        except ConfigError as error:
            parser.error(" ".join(str(error).split()))
    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return
    rows = []
    for count in args.micro_batches:  # a fresh process each: a peak never goes down within one
        child = [arg for arg in sys.argv[1:] if arg]
        done = subprocess.run([sys.executable, __file__, *child, "--one", str(count)], capture_output=True,
                              text=True)
        if done.returncode:  # the child's own error (a count past --batch, ...), not a bare CalledProcessError
            sys.exit(f"micro_batches.py: --micro-batches {count} failed:\n{done.stderr.strip()}")
        rows.append(json.loads(done.stdout.splitlines()[-1]))
    baseline = rows[0]["saved_for_backward_peak_bytes"]
    for row in rows:
        row["saved_for_backward_over_first"] = round(row["saved_for_backward_peak_bytes"] / baseline, 3)
        print(json.dumps(row))


if __name__ == "__main__":
    with sigterm_as_ctrl_c():  # a stopped benchmark still removes its temporary files and child processes
        main()
