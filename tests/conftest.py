"""Fixtures shared by every test folder."""

import contextlib
import functools
import signal
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import redis
import torch

from services.broker import Broker
from services.messages import RolloutBatch
from services.redis_server import EmbeddedRedis, connect


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server started for this test session (never the machine's own server)."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A namespace of this test's own, deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    Broker(redis_client, name).delete_namespace()


@pytest.fixture
def broker(redis_client: redis.Redis, namespace: str) -> Broker:
    return Broker(redis_client, namespace)


MakeBatch = Callable[..., RolloutBatch]


@pytest.fixture
def make_batch() -> MakeBatch:
    """Random rollout batches: B documents x c positions x n samples of k tokens, hidden size D."""

    def build(seed: int = 0, docs: int = 1, chunks: int = 2, samples: int = 1, k: int = 3, dim: int = 4,
              hidden: bool = True, ground_truth: bool = True) -> RolloutBatch:
        generator = torch.Generator().manual_seed(seed)
        rows = docs * chunks * samples
        return RolloutBatch(
            document_batch_id=f"doc-{seed}",
            policy_version=seed % 3,
            worker_id="rollout-0",
            num_samples=samples,
            rollout_len=k,
            positions=torch.randint(20, 500, (docs, chunks), generator=generator),
            entropies=torch.rand(docs, chunks, generator=generator),
            rollout_tokens=torch.randint(0, 8, (rows, k), generator=generator),
            behaviour_logprobs=-torch.rand(rows, k, generator=generator),
            rollout_hidden=torch.randn(rows, k, dim, generator=generator) if hidden else None,
            ground_truth_hidden=torch.randn(rows, k, dim, generator=generator) if hidden else None,
            ground_truth_tokens=torch.randint(0, 8, (rows, k), generator=generator) if ground_truth else None,
        )

    return build


@pytest.fixture
def dead_letter_error(redis_url: str) -> Callable[[Any, str], str]:
    """The error a run ends with on the dead letters of Redis namespace `namespace`: (config, namespace) -> the
    orchestrator's ServiceError text (a real Orchestrator on the test Redis; nothing of Ray is started)."""
    from services.failures import ServiceError
    from services.orchestrator import Orchestrator

    def error(config: Any, namespace: str) -> str:
        orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
        try:
            with pytest.raises(ServiceError) as failure:
                orchestrator._check_dead_letters()
        finally:
            orchestrator.client.close()
        return str(failure.value)

    return error


# Operators whose result depends on tensor values the host must read back first: on a GPU each one waits
# for the queued work. _local_scalar_dense is .item(), bool(t), int(t), float(t) (and torch.allclose, a
# masked_select's size, ...); nonzero is also boolean-mask indexing x[mask], torch.where(cond), argwhere;
# unique* and masked_select size their outputs by the values; equal answers a Python bool; bincount sizes
# its output by the largest value. On the CPU some of these read the data directly without a nested
# _local_scalar_dense, so each is counted by its own name. A read nested in another counted operator
# (masked_select's own .item(), the equal inside unique_dim) is the same wait and counts once.
HOST_READ_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal", "aten::bincount",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
})


class HostReads(int):
    """The number of host reads; its repr lists what read (pytest shows it when an assertion fails)."""

    def __new__(cls, sites: list[str]) -> "HostReads":
        reads = super().__new__(cls, len(sites))
        reads.sites = sites
        return reads

    def __repr__(self) -> str:
        if not self.sites:
            return "0"
        return f"{int(self)} host reads: " + ", ".join(f"{n} x {site}" for site, n in Counter(self.sites).items())

    __str__ = int.__repr__


def _caller() -> str:
    """file:line of the frame that called the wrapped Tensor method (the code under test)."""
    frame = traceback.extract_stack(limit=3)[0]
    return f"{frame.filename}:{frame.lineno}"


@pytest.fixture
def host_reads() -> Callable[[Callable[[], Any]], tuple[int, Any]]:
    """Runs a call and counts the times it reads tensor values back on the host: each one waits for a
    GPU's queued work. Returns (reads, the call's result). Counted: the HOST_READ_OPS the profiler
    records, and calls of Tensor.tolist and Tensor.numpy (neither runs an operator on a CPU tensor).
    A plain .cpu() copy is not counted: on the CPU, where these tests run, it is a no-op."""
    def count(call: Callable[[], Any]) -> tuple[int, Any]:
        wrapped: list[str] = []

        def reading(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(method)
            def method_that_counts(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                wrapped.append(f"Tensor.{name} at {_caller()}")
                return method(self, *args, **kwargs)
            return method_that_counts

        patches = {name: reading(name, getattr(torch.Tensor, name)) for name in ("tolist", "numpy")}
        with contextlib.ExitStack() as stack:
            for name, method in patches.items():
                stack.enter_context(mock.patch.object(torch.Tensor, name, method))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                result = call()
        ops = [event.name for event in prof.events() if event.name in HOST_READ_OPS
               and not _inside_a_host_read(event)]
        return HostReads(ops + wrapped), result
    return count


def _inside_a_host_read(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in HOST_READ_OPS:
            return True
        parent = parent.cpu_parent
    return False


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as in a terminal. A process started in the background (`cmd &`, a CI job
    runner) inherits SIGINT ignored, and a run rightly leaves an ignored signal ignored (refine.loop.stop_requests):
    tests that press Ctrl-C must not depend on how pytest was started."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
