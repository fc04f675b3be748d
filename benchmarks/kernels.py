"""Achieved GFLOP/s of the CPU chunked delta rule against the same run's dense matmul GFLOP/s.

Prints one JSON object per line: first the matmul references, then one line per sequence length with
the chunked kernel's forward+backward time, its GFLOP/s and the ratio to the matmul references.

FLOP counting ("flop_count" in the output): the exact matmul FLOPs the chunked algorithm performs in
its forward pass, per (batch, head, chunk) with chunk C (C' = C rounded up to a power of two), key dim
K and value dim V: gram k k^T 2C^2K; inverse of the UT system by block doubling 2C'(C'^2 - 1)/3;
W = T K 2C^2K and U0 = T V 2C^2V; u = u0 - W S 2CKV and the state update 2CKV in the loop over
chunks (a T that fits in one chunk has no loop: no state update); inter-chunk output q S 2CKV, scores
q k^T 2C^2K, scores u 2C^2V. Elementwise work is not counted; the backward pass is counted as 2x the
forward. "gflops_solve_count" counts the UT step as a triangular solve, C(C-1)(K+V), instead (the
least work any WY implementation does for it).

The primary reference ("matmul_batched") multiplies the same number of C x K by K x V matrices as one
batched torch.matmul, the shape the kernel's work comes in; "matmul_large" is one 1024^3 matmul, the
machine's best case. A matmul rate is measured over a span: the matmul repeats until --span-seconds
(0.5 s) have passed, and the rate is the best of several spans. One call takes 0.1-4 ms, so a few
calls fit inside one burst of a neighbour's load and even their best would be slowed with it; a span
averages over bursts instead. The batched reference's spans take turns with the kernel's timed runs,
so load on a shared machine falls on both alike. The kernel's "gflops" uses its median time and the
reference its best span, so the ratios ("ratio_vs_batched" is the goal's) err low, not high.

Usage: python benchmarks/kernels.py [--quick] [--threads N] [--gated] [--lengths T ...] [--span-seconds S]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refine.cli import positive_int  # noqa: E402
from refine.kernels.chunk import chunk_delta_rule  # noqa: E402
from refine.runtime import tune_allocator  # noqa: E402

GOAL_RATIO = 0.30


def chunk_forward_flops(
    batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int, chunk: int, *, solve_count: bool = False
) -> int:
    """Forward matmul FLOPs of chunk_delta_rule (see the module docstring)."""
    num_chunks = max(1, -(-seq_len // chunk))
    c, k, v = chunk, key_dim, value_dim
    padded = 1 << max(c - 1, 0).bit_length()
    if solve_count:
        ut_transform = c * (c - 1) * (k + v)
    else:
        ut_transform = 2 * padded * (padded * padded - 1) // 3 + 2 * c * c * (k + v)
    state_update = 2 * c * k * v if num_chunks > 1 else 0  # one chunk: chunk_delta_rule skips the loop
    per_chunk = (2 * c * c * k + ut_transform + 2 * c * k * v + state_update + 2 * c * k * v + 2 * c * c * k
                 + 2 * c * c * v)
    return batch * heads * num_chunks * per_chunk


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, minimum) wall seconds of fn over repeats calls after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def span_gflops(fn, flops: int, span: float) -> float:
    """GFLOP/s of fn (flops per call) over at least `span` seconds of back-to-back calls."""
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= span:
            return flops * calls / elapsed / 1e9


def matmul(batch: int, m: int, k: int, n: int) -> tuple[Callable[[], object], int]:
    """A batched matmul of random [batch, m, k] x [batch, k, n] matrices, and its FLOPs."""
    a = torch.randn(batch, m, k)
    b = torch.randn(batch, k, n)
    return lambda: torch.matmul(a, b), 2 * batch * m * k * n


def run_chunk(batch: int, seq_len: int, heads: int, dim: int, chunk: int, gated: bool, repeats: int,
              reference: tuple[Callable[[], object], int], span: float) -> dict:
    """The kernel's forward+backward and forward times, with the reference matmul's spans taking turns
    with the timed forward+backward runs (`reference_gflops`: the best span)."""
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(batch, seq_len, heads, dim, generator=gen), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(batch, seq_len, heads, dim, generator=gen), dim=-1).requires_grad_()
    v = torch.randn(batch, seq_len, heads, dim, generator=gen).requires_grad_()
    beta = torch.randn(batch, seq_len, heads, generator=gen).sigmoid().requires_grad_()
    g = -F.softplus(torch.randn(batch, seq_len, heads, generator=gen)).requires_grad_() if gated else None
    weight = torch.randn(batch, seq_len, heads, dim, generator=gen)

    def forward_backward():
        o, _ = chunk_delta_rule(q, k, v, beta, g, chunk_size=chunk)
        (o * weight).sum().backward()

    def forward_only():
        with torch.no_grad():
            chunk_delta_rule(q, k, v, beta, g, chunk_size=chunk)

    reference_fn, reference_flops = reference
    forward_backward()  # warm-up
    reference_fn()
    times, reference_rates = [], []
    for _ in range(repeats):
        reference_rates.append(span_gflops(reference_fn, reference_flops, span))
        start = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - start)
    reference_rates.append(span_gflops(reference_fn, reference_flops, span))  # a span after the last run too
    median, minimum = statistics.median(times), min(times)
    forward_median, _ = timed(forward_only, repeats)
    flops = 3 * chunk_forward_flops(batch, seq_len, heads, dim, dim, chunk)
    solve_flops = 3 * chunk_forward_flops(batch, seq_len, heads, dim, dim, chunk, solve_count=True)
    return dict(
        seconds_fwd_bwd=round(median, 5),
        seconds_fwd_bwd_min=round(minimum, 5),
        seconds_fwd=round(forward_median, 5),
        gflop_fwd_bwd=round(flops / 1e9, 4),
        gflops=round(flops / median / 1e9, 2),
        gflops_best=round(flops / minimum / 1e9, 2),
        gflops_solve_count=round(solve_flops / median / 1e9, 2),
        reference_gflops=max(reference_rates),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short sequences and one repeat: a smoke run")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--gated", action="store_true", help="gated delta rule (adds the decay g)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--dim", type=positive_int, default=64, help="head dim of q, k and v")
    parser.add_argument("--chunk", type=positive_int, default=64)
    parser.add_argument(
        "--lengths", type=positive_int, nargs="+", default=None, help="sequence lengths (default 1024 4096 16384)"
    )
    parser.add_argument("--span-seconds", type=float, default=0.5,
                        help="seconds of back-to-back matmuls per reference measurement")
    args = parser.parse_args()
    if not (math.isfinite(args.span_seconds) and args.span_seconds > 0):  # nan would never end a span
        parser.error(f"--span-seconds must be a finite number above 0, got {args.span_seconds}")
    tune_allocator()  # as every refine process does
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths = args.lengths or ([256, 1024] if args.quick else [1024, 4096, 16384])
    repeats = 1 if args.quick else 5
    common = dict(threads=torch.get_num_threads(), dtype="float32", torch=torch.__version__)

    large_fn, large_flops = matmul(1, 1024, 1024, 1024)
    large_fn()  # warm-up
    large = max(span_gflops(large_fn, large_flops, args.span_seconds) for _ in range(3))
    reference = dict(benchmark="kernels", what="matmul_large", shape=[1024, 1024, 1024], gflops=round(large, 2))
    print(json.dumps(dict(**reference, **common)))
    for seq_len in lengths:
        num_matrices = args.batch * args.heads * max(1, -(-seq_len // args.chunk))
        result = run_chunk(args.batch, seq_len, args.heads, args.dim, args.chunk, args.gated, repeats,
                           matmul(num_matrices, args.chunk, args.dim, args.dim), args.span_seconds)
        batched = result.pop("reference_gflops")
        ratio = result["gflops"] / batched
        print(json.dumps(dict(
            benchmark="kernels",
            what="chunk_delta_rule_fwd_bwd",
            rule="gated_delta" if args.gated else "delta",
            T=seq_len, B=args.batch, H=args.heads, d=args.dim, chunk=args.chunk,
            **result,
            flop_count="exact forward matmul FLOPs, backward counted as 2x forward",
            matmul_batched_shape=[num_matrices, args.chunk, args.dim, args.dim],
            matmul_batched_gflops=round(batched, 2),
            matmul_rate="best of spans of at least span_seconds, taking turns with the fwd+bwd runs",
            span_seconds=args.span_seconds,
            ratio_vs_batched=round(ratio, 3),
            ratio_vs_large=round(result["gflops"] / large, 3),
            ratio_solve_count_vs_batched=round(result["gflops_solve_count"] / batched, 3),
            goal_ratio=GOAL_RATIO,
            goal_met=ratio >= GOAL_RATIO,
            **common,
        )))


if __name__ == "__main__":
    main()
