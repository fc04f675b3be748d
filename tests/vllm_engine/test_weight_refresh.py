"""Weight refresh: new weights are served without restarting vLLM, and the served version is reported."""

from __future__ import annotations

import pytest
import torch
from vllm_parity import (
    assert_bf16_accurate,
    assert_greedy_parity,
    chosen,
    float32_copy,
    requires_vllm,
    teacher_forced_logprobs,
)

from refine.algorithm.rollout import snapshot_rollouts
from refine.models import build_model

pytestmark = requires_vllm


def test_rollouts_follow_refreshed_weights(engine, documents):
    ids, lengths = documents
    cfg = engine.config.refine
    llm = engine.llm
    original = {k: v.clone() for k, v in engine.policy.state_dict().items()}
    before = engine.rollout(ids, lengths, torch.Generator().manual_seed(2))

    torch.manual_seed(123)
    fresh = build_model(engine.policy.config, dtype=torch.bfloat16).state_dict()
    engine.load_weights(fresh, version=3)
    try:
        assert engine.llm is llm, "a refresh must not restart vLLM"
        assert engine.weight_version == 3
        after = engine.rollout(ids, lengths, torch.Generator().manual_seed(2), positions=before.positions)
        assert after.policy_version == 3
        assert not torch.equal(after.tokens, before.tokens)
        # Follows the new weights: parity with the snapshot engine on them. The prefix cache was
        # emptied, so no state computed with the old weights was reused.
        snap = snapshot_rollouts(engine.policy, ids, lengths, cfg, torch.Generator().manual_seed(2),
                                 positions=after.positions)
        reference = teacher_forced_logprobs(float32_copy(engine.policy), ids, lengths, after.positions,
                                            after.tokens, cfg.num_samples)
        assert_greedy_parity(after.tokens, snap.tokens, reference)
        assert engine.last_cached_tokens[0] == 0
    finally:
        engine.load_weights(original)
    # Back on the first weights (next version), vLLM gives the first rollouts again (up to bf16 ties:
    # cached states now sit at other chunk boundaries than before).
    assert engine.weight_version == 4
    again = engine.rollout(ids, lengths, torch.Generator().manual_seed(2), positions=before.positions)
    args = (ids, lengths, again.positions, again.tokens, cfg.num_samples)
    reference32 = teacher_forced_logprobs(float32_copy(engine.policy), *args)
    assert_greedy_parity(again.tokens, before.tokens, reference32)
    assert_bf16_accurate(again.logprobs, chosen(reference32, again.tokens),
                         chosen(teacher_forced_logprobs(engine.policy, *args), again.tokens), "first weights again")


def test_refresh_across_the_process_boundary(documents):
    """With vLLM's engine core in its own process, weights travel as a safetensors path (never pickled)."""
    from vllm_parity import run_config

    from rollout_workers.vllm_engine import VllmEngine, VllmEngineConfig

    ids, lengths = documents
    settings = VllmEngineConfig(max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=64,
                                state_cache_bytes=32 << 20, multiprocessing=True)
    engine = VllmEngine(run_config("gated_deltanet", num_chunks=2), settings)
    try:
        before = engine.rollout(ids, lengths, torch.Generator().manual_seed(0))
        torch.manual_seed(7)
        engine.load_weights(build_model(engine.policy.config, dtype=torch.bfloat16).state_dict(), version=11)
        after = engine.rollout(ids, lengths, torch.Generator().manual_seed(0), positions=before.positions)
        snap = snapshot_rollouts(engine.policy, ids, lengths, engine.config.refine, None, positions=before.positions)
        reference = teacher_forced_logprobs(float32_copy(engine.policy), ids, lengths, after.positions, after.tokens,
                                            engine.config.refine.num_samples)
        assert after.policy_version == engine.weight_version == 11
        assert not torch.equal(after.tokens, before.tokens)
        assert_greedy_parity(after.tokens, snap.tokens, reference)
    finally:
        engine.close()


def test_workers_sharing_a_weights_dir_keep_to_their_own_checkpoints(tmp_path, documents, monkeypatch):
    """rollout.vllm.weights_dir is one setting for all of a run's workers: each engine stages in a folder of
    its own and deletes only its own checkpoints; a failed reload leaves our model as it was and the engine
    refusing all work."""
    from vllm_parity import run_config

    from rollout_workers.vllm_engine import VllmEngine, VllmEngineConfig

    ids, lengths = documents
    settings = VllmEngineConfig(max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=64,
                                state_cache_bytes=32 << 20, multiprocessing=True, weights_dir=str(tmp_path))
    config = run_config("gated_deltanet", num_chunks=2)
    a = VllmEngine(config, settings)
    try:
        b = VllmEngine(config, settings)
        try:
            assert a._staging.parent == b._staging.parent == tmp_path and a._staging != b._staging
            torch.manual_seed(1)
            new = build_model(a.policy.config, dtype=torch.bfloat16).state_dict()
            a.load_weights(new, version=5)
            served_by_a = sorted(a._staging.iterdir())
            b.load_weights(new, version=2)  # B lags behind A: the staged names of old would collide
            assert all(path.exists() for path in served_by_a), "B deleted A's checkpoint"
            a.load_weights(new, version=6)
            assert [p.name for p in a._staging.iterdir()] == ["v2"]  # its second refresh; v1 deleted
            assert [p.name for p in b._staging.iterdir()] == ["v1"]
            before = a.rollout(ids, lengths, torch.Generator().manual_seed(0))
            assert before.policy_version == 6
        finally:
            b.close()
        assert [p.name for p in tmp_path.iterdir()] == [a._staging.name], "B leaves only A's folder behind"

        # vLLM fails to reload (here: its checkpoint is missing, which kills its engine process).
        served = {name: tensor.clone() for name, tensor in a.policy.state_dict().items()}
        monkeypatch.setattr(a, "_stage", lambda state_dict: tmp_path / "missing")
        torch.manual_seed(2)
        with pytest.raises(RuntimeError, match="(?s)loading weights version 7 failed.*the engine is unusable now"):
            a.load_weights(build_model(a.policy.config, dtype=torch.bfloat16).state_dict(), version=7)
        assert a.weight_version == 6
        for name, tensor in a.policy.state_dict().items():
            assert torch.equal(tensor, served[name]), f"our model took {name} that vLLM does not serve"
        for call in (lambda: a.rollout(ids, lengths, torch.Generator().manual_seed(0)),
                     lambda: a.load_weights(served), lambda: a.generate(ids[:1, :50], 4)):
            with pytest.raises(RuntimeError, match="this vLLM engine is unusable: loading weights version 7 failed"):
                call()
    finally:
        a.close()
    assert list(tmp_path.iterdir()) == []
