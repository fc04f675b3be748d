"""The distributed service's overhead, measured in one run. Prints one JSON object per line:

- documents/s through Ray + Redis (on-policy, max_staleness = 0, and one step of staleness) against
  the single-process one-pass loop on the same config (`refine.loop.train`, train.mode=onepass);
- the learner's seconds per step (one-pass update from scored rollouts) against an NTP step on the
  same model and batch;
- weight publish-to-fetch latency through the Redis weight store: the learner process publishes,
  a separate process waiting for the version fetches it.

    python benchmarks/pipeline.py [--seq-len 2048] [--batch-size 4] [--steps 10] [--rounds 3]
                                  [--threads 1] [--weights-mb 50 500] [--repeats 5]
Steady-state rates leave out the first step (actor start-up, first weight fetch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import ray
import torch

from learner.update import onepass_update
from refine.cli import positive_int
from refine.algorithm.losses import ntp_loss
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import LossResult, score_rollouts
from refine.config import RunConfig, validate_config
from refine.data.stream import document_batches
from refine.loop import prepare_model, train
from refine.runtime import sigterm_as_ctrl_c, tune_allocator
from refine.step import make_optimizer, optimizer_step
from refine.tokenizer import load_tokenizer
from services.orchestrator import run
from services.redis_server import EmbeddedRedis, connect
from services.weight_store import RedisWeightStore


def bench_config(args: argparse.Namespace, out_dir: Path, **service) -> RunConfig:
    return validate_config({
        "data": {"source": "synthetic", "seq_len": args.seq_len, "min_length": args.seq_len // 2,
                 "num_documents": 64},
        "train": {"mode": "onepass", "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                  "checkpoint_every": 0, "out_dir": str(out_dir), "seed": 0},
        "refine": {"num_chunks": 8, "rollout_len": 5, "num_samples": 1, "reward": "cosine"},
        "service": {"num_rollout_workers": 1, "num_reward_replicas": 1, "worker_cpus": float(args.threads),
                    "metrics_discovery_dir": str(out_dir / "prometheus"), **service},
    })


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def local_docs_per_second(config: RunConfig) -> float:
    train(config, progress=False)
    seconds = [row["step_seconds"] for row in read_rows(Path(config.train.out_dir))][1:]
    return config.train.batch_size * len(seconds) / sum(seconds)


def service_docs_per_second(config: RunConfig, redis_url: str) -> float:
    run(config, progress=False, redis_url=redis_url)
    times = [row["wall_time"] for row in read_rows(Path(config.train.out_dir))]
    return config.train.batch_size * (len(times) - 1) / (times[-1] - times[0])


def throughput(args: argparse.Namespace, root: Path, redis_url: str) -> dict:
    """Rounds of (local, service on-policy, service one step stale), interleaved so that changes in
    machine load hit every variant alike; medians over rounds."""
    rates: dict[str, list[float]] = {"local": [], "service_0": [], "service_1": []}
    for round_index in range(args.rounds):
        rates["local"].append(local_docs_per_second(bench_config(args, root / f"local-{round_index}")))
        for staleness in (0, 1):
            config = bench_config(args, root / f"service-{staleness}-{round_index}", max_staleness=staleness,
                                  batches_in_flight=staleness + 1, namespace=f"bench-{uuid.uuid4().hex[:8]}")
            rates[f"service_{staleness}"].append(service_docs_per_second(config, redis_url))
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {"benchmark": "pipeline", "measure": "documents_per_second", "seq_len": args.seq_len,
              "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads, "rounds": args.rounds,
              "single_process_onepass": round(median["local"], 3)}
    for staleness in (0, 1):
        result[f"service_max_staleness_{staleness}"] = round(median[f"service_{staleness}"], 3)
        result[f"ratio_max_staleness_{staleness}"] = round(median[f"service_{staleness}"] / median["local"], 3)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    return result


def learner_vs_ntp(args: argparse.Namespace, root: Path) -> dict:
    """The learner's step (one-pass update from scored rollouts) against an NTP step, same batch."""
    torch.set_num_threads(args.threads)
    config = bench_config(args, root / "steps")
    model = prepare_model(config)
    optimizer = make_optimizer(model, config.optim)
    batch = next(document_batches(config, load_tokenizer(None)))
    ids, lengths = batch.input_ids, batch.lengths
    generator = torch.Generator().manual_seed(0)
    rollouts = snapshot_rollouts(model, ids, lengths, config.refine, generator)
    rollouts.rewards = score_rollouts(rollouts, config.refine)

    def ntp_step() -> None:
        loss = ntp_loss(model(ids, lengths=lengths, output_state=False).logits, ids, lengths)
        optimizer_step(model, optimizer, LossResult(loss, loss, loss.new_zeros(()), {}), config.optim.grad_clip)

    def learner_step() -> None:
        onepass_update(model, optimizer, ids, lengths, rollouts, config)

    times: dict[str, list[float]] = {"ntp": [], "learner": []}
    for name, fn in (("ntp", ntp_step), ("learner", learner_step)):
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        for name, fn in (("ntp", ntp_step), ("learner", learner_step)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    ntp, learner = statistics.median(times["ntp"]), statistics.median(times["learner"])
    return {"benchmark": "pipeline", "measure": "learner_step_vs_ntp", "seq_len": args.seq_len,
            "batch_size": args.batch_size, "threads": args.threads, "ntp_step_s": round(ntp, 4),
            "learner_step_s": round(learner, 4), "ratio": round(learner / ntp, 3)}


# The Redis URL comes in the environment: it may hold a password, which a command line shows to every user (ps).
_FETCHER = """
import json, os, sys, time
from services.redis_server import connect
from services.weight_store import RedisWeightStore
store = RedisWeightStore(connect(os.environ["REFINE_REDIS_URL"], socket_timeout_s=None), sys.argv[1])
print("ready", flush=True)
version = store.wait_for_version(int(sys.argv[2]), timeout_s=600, poll_s=0.002)
started = time.perf_counter()
_, state_dict = store.fetch(version)
fetched_at = time.time()
print(json.dumps({"fetched_at": fetched_at, "fetch_s": time.perf_counter() - started,
                  "bytes": sum(t.numel() * t.element_size() for t in state_dict.values())}), flush=True)
"""


def weight_sync(megabytes: int, redis_url: str) -> dict:
    namespace = f"bench-weights-{uuid.uuid4().hex[:8]}"
    store = RedisWeightStore(connect(redis_url, socket_timeout_s=None), namespace)
    # `megabytes` of float32 in tensors of about 10 MB, a model's worth of them.
    count = max(1, round(megabytes / 10))
    elements = round(megabytes * 250_000 / count)
    state_dict = {f"layer{i}.weight": torch.randn(elements) for i in range(count)}
    fetcher = subprocess.Popen([sys.executable, "-c", _FETCHER, namespace, "1"], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, REFINE_REDIS_URL=redis_url))
    assert fetcher.stdout is not None and fetcher.stdout.readline().strip() == "ready"
    started_at, started = time.time(), time.perf_counter()
    store.publish(state_dict, 1)
    publish_s = time.perf_counter() - started
    report = json.loads(fetcher.stdout.readline())
    fetcher.wait(timeout=60)
    store.clear()
    return {"benchmark": "pipeline", "measure": "weight_publish_to_fetch", "transport": "redis_weight_store",
            "megabytes": round(report["bytes"] / 1e6, 1), "publish_s": round(publish_s, 3),
            "fetch_s": round(report["fetch_s"], 3), "publish_to_fetch_s": round(report["fetched_at"] - started_at, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=positive_int, default=2048)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds of the throughput runs")
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads of the loop, the learner and the worker")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--weights-mb", type=positive_int, nargs="*", default=[50, 500])
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if args.steps < 2:  # the rates leave the first step out: its compile and warm-up
        parser.error(f"--steps must be at least 2, got {args.steps}")
    try:  # settings the run config or its synthetic corpus refuses: one line, before anything starts
        next(document_batches(bench_config(args, Path(tempfile.gettempdir())), load_tokenizer(None)))
    except ValueError as error:  # a ConfigError, or a data.seq_len too short for the recall documents
        parser.error(" ".join(str(error).split()))
    tune_allocator()  # as every refine process does

    with tempfile.TemporaryDirectory(prefix="refine-bench-") as tmp, EmbeddedRedis() as redis_server:
        root = Path(tmp)
        print(json.dumps(learner_vs_ntp(args, root)), flush=True)
        for megabytes in args.weights_mb:
            print(json.dumps(weight_sync(megabytes, redis_server.url)), flush=True)
        if not args.skip_throughput:
            ray.init(num_cpus=max(4, args.threads + 2), include_dashboard=False,
                     object_store_memory=100 * 1024 * 1024, log_to_driver=False)
            try:
                print(json.dumps(throughput(args, root, redis_server.url)), flush=True)
            finally:
                ray.shutdown()


if __name__ == "__main__":
    with sigterm_as_ctrl_c():  # a stopped benchmark still removes its temporary files and child processes
        main()
