"""Fixtures for the reward service tests: a broker in a namespace of its own, rollout batches."""

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from services.broker import Broker
from services.messages import RolloutBatch
from services.redis_server import connect


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def broker(redis_client: redis.Redis) -> Iterator[Broker]:
    broker = Broker(redis_client, f"test-reward-{uuid.uuid4().hex[:12]}")
    yield broker
    broker.delete_namespace()


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
