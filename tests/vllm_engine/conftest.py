"""Fixtures of the vLLM engine tests: one engine per architecture, started once per session.

These tests need the separate vLLM environment: `bash scripts/setup_vllm_env.sh`, then
`.venv-vllm/bin/python -m pytest tests/vllm_engine`. Elsewhere they are skipped with that reason.
"""

from __future__ import annotations

import pytest
import torch
from vllm_parity import CHUNK_TOKENS, MODELS, SKIP_REASON, run_config

from rollout_workers.vllm_engine import vllm_available


@pytest.fixture(scope="session", params=sorted(MODELS))
def engine(request):
    if not vllm_available():
        pytest.skip(SKIP_REASON)
    from rollout_workers.vllm_engine import VllmEngine, VllmEngineConfig

    settings = VllmEngineConfig(max_model_len=2048, max_num_seqs=CHUNK_TOKENS, max_num_batched_tokens=CHUNK_TOKENS,
                                state_cache_bytes=64 << 20)
    # A fixed worker id: on CPU sampled rollouts draw from vLLM's generator, seeded from it, the same every run.
    eng = VllmEngine(run_config(request.param), settings, worker_id="tests")
    yield eng
    eng.close()


@pytest.fixture
def documents() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 420), generator=torch.Generator().manual_seed(11))
    return ids, torch.tensor([420, 350])
