"""Fixtures for the reward service tests: rollout batches (the broker comes from tests/conftest.py)."""

from collections.abc import Callable

import pytest
import torch

from services.messages import RolloutBatch

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
