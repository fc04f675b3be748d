"""vLLM engine vs snapshot engine on the same tiny DeltaNet / Gated DeltaNet (bf16, head dim 64)."""

from __future__ import annotations

import pytest
import torch

from refine.algorithm.rollout import snapshot_rollouts
from refine.generate import generate
from vllm_parity import (
    CHUNK_TOKENS,
    assert_bf16_accurate,
    assert_greedy_parity,
    chosen,
    float32_copy,
    requires_vllm,
    run_config,
    teacher_forced_logprobs,
)

pytestmark = requires_vllm


def test_greedy_rollouts_match_snapshot_engine(engine, documents):
    ids, lengths = documents
    cfg = engine.config.refine
    out = engine.rollout(ids, lengths, torch.Generator().manual_seed(0))
    snap = snapshot_rollouts(engine.policy, ids, lengths, cfg, torch.Generator().manual_seed(0),
                             positions=out.positions)
    n, k = cfg.num_samples, cfg.rollout_len

    assert out.tokens.shape == (ids.shape[0] * cfg.num_chunks * n, k)
    # Prefixes longer than one scheduler step (CHUNK_TOKENS) were prefilled in chunks.
    assert int(out.positions.max()) > 4 * CHUNK_TOKENS
    reference32 = teacher_forced_logprobs(float32_copy(engine.policy), ids, lengths, out.positions, out.tokens, n)
    assert_greedy_parity(out.tokens, snap.tokens, reference32)

    # Log-probs as close to the float32 model as the snapshot engine's own bf16 ones.
    same = (out.tokens == snap.tokens).all(-1)
    assert_bf16_accurate(out.logprobs[same], chosen(reference32, out.tokens)[same], snap.logprobs[same], "greedy")

    # Everything the rewards read comes from our own model, identical to the snapshot engine's.
    torch.testing.assert_close(out.target_tokens, snap.target_tokens, rtol=0, atol=0)
    torch.testing.assert_close(out.target_hidden, snap.target_hidden, rtol=0, atol=0)
    torch.testing.assert_close(out.hidden[same].float(), snap.hidden[same].float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.entropies, snap.entropies)


def test_greedy_samples_agree_and_reuse_the_prefix_cache(engine, documents):
    ids, lengths = documents
    n = engine.config.refine.num_samples
    out = engine.rollout(ids, lengths, torch.Generator().manual_seed(1))
    copies = out.tokens.view(-1, n, out.rollout_len)
    assert bool((copies == copies[:, :1]).all()), "greedy samples of one prefix must be identical"
    # Every greedy copy after the first starts from the first one's cached states (block-aligned).
    hits = torch.tensor(engine.last_cached_tokens).view(-1, n)
    assert bool((hits[:, 1:] > 0).all())
    assert bool((hits[:, 1:] <= out.positions.reshape(-1, 1)).all())


def test_prefix_cache_hit_gives_the_same_continuation(engine, documents):
    ids, _ = documents
    prompt = ids[0, :300].tolist()
    (cold,), = engine.sample([prompt], 12)
    (warm,), = engine.sample([prompt], 12)
    assert engine.last_cached_tokens[0] >= 300 - 2 * CHUNK_TOKENS, "a repeated prompt must hit the prefix cache"
    # The same continuation up to bf16 rounding (the cached state was saved at a block boundary).
    full = torch.tensor([prompt + warm.token_ids])
    with torch.no_grad():
        reference = torch.log_softmax(float32_copy(engine.policy)(full).logits[:, len(prompt) - 1:-1], -1)
        reference16 = torch.log_softmax(engine.policy(full).logits[:, len(prompt) - 1:-1].float(), -1)
    tokens = torch.tensor([warm.token_ids])
    assert_greedy_parity(tokens, torch.tensor([cold.token_ids]), reference)
    assert_bf16_accurate(torch.tensor([warm.logprobs]), chosen(reference, tokens), chosen(reference16, tokens),
                         "after a prefix-cache hit")


def test_long_greedy_answers_match_our_generate(engine, documents):
    ids, _ = documents
    prompts = torch.cat([ids[:, :200], ids[:, 200:400]])
    answers = engine.generate(prompts, 40)
    assert [len(a) for a in answers] == [40] * 4
    tokens = torch.tensor(answers)
    full = torch.cat([prompts, tokens], dim=1)
    with torch.no_grad():
        logits = float32_copy(engine.policy)(full).logits[:, prompts.shape[1] - 1:-1]
    reference = torch.log_softmax(logits, -1)
    ours = torch.tensor(generate(engine.policy, prompts, 40))
    assert_greedy_parity(tokens, ours, reference, min_agreement=0.25)

    # Stopping at an end-of-sequence id: the answer ends right before its first occurrence.
    eos = answers[0][10]
    stopped = engine.generate(prompts[:1], 40, eos_id=eos)
    assert stopped[0] == answers[0][:answers[0].index(eos)]


def _sampled_rollouts(engine, documents, seeds):
    ids, lengths = documents
    cfg = run_config(engine.config.model.model_type, temperature=0.7, num_samples=3).refine
    saved = engine.config.refine
    engine.config.refine = cfg
    try:
        return cfg, [engine.rollout(ids, lengths, torch.Generator().manual_seed(seed)) for seed in seeds]
    finally:
        engine.config.refine = saved


def test_sampled_rollouts_follow_the_logprob_convention(engine, documents):
    ids, lengths = documents
    cfg, (out,) = _sampled_rollouts(engine, documents, [5])
    samples = out.tokens.view(-1, cfg.num_samples, cfg.rollout_len)
    assert not bool((samples == samples[:, :1]).all()), "n samples of one prefix should differ"
    # log_softmax(logits / temperature) of the sampled token, unfiltered: the learner's definition.
    args = (ids, lengths, out.positions, out.tokens, cfg.num_samples)
    reference32 = teacher_forced_logprobs(float32_copy(engine.policy), *args, temperature=cfg.temperature)
    reference16 = teacher_forced_logprobs(engine.policy, *args, temperature=cfg.temperature)
    assert_bf16_accurate(out.logprobs, chosen(reference32, out.tokens), chosen(reference16, out.tokens), "sampled")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="vLLM's CPU backend cannot seed requests that are prefilled in chunks (vLLM 0.32)")
def test_sampled_rollouts_are_a_function_of_the_generator_seed(engine, documents):
    _, (first, again, other) = _sampled_rollouts(engine, documents, [5, 5, 6])
    torch.testing.assert_close(again.tokens, first.tokens, rtol=0, atol=0)
    assert not torch.equal(other.tokens, first.tokens)


def test_a_sigmoid_output_gate_is_served_with_sigmoid(documents):
    """fla's Gated DeltaNet with output_gate_activation='sigmoid': vLLM gates with sigmoid too (not silu)."""
    from rollout_workers.vllm_engine import VllmEngine, VllmEngineConfig

    ids, lengths = documents
    config = run_config("gated_deltanet", num_chunks=2)
    config = config.model_copy(update={"model": config.model.model_copy(update={"output_gate_activation": "sigmoid"})})
    settings = VllmEngineConfig(max_model_len=1024, max_num_seqs=CHUNK_TOKENS, max_num_batched_tokens=CHUNK_TOKENS,
                                state_cache_bytes=32 << 20)
    engine = VllmEngine(config, settings)
    try:
        out = engine.rollout(ids, lengths, torch.Generator().manual_seed(0))
        cfg = engine.config.refine
        snap = snapshot_rollouts(engine.policy, ids, lengths, cfg, None, positions=out.positions)
        args = (ids, lengths, out.positions, out.tokens, cfg.num_samples)
        reference32 = teacher_forced_logprobs(float32_copy(engine.policy), *args)
        assert_greedy_parity(out.tokens, snap.tokens, reference32)
        assert_bf16_accurate(out.logprobs, chosen(reference32, out.tokens),
                             chosen(teacher_forced_logprobs(engine.policy, *args), out.tokens), "sigmoid gate")
    finally:
        engine.close()
