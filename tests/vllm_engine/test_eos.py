"""Rollouts never sample the model's EOS, as the snapshot engine; log-probs stay the unmasked distribution's."""

from __future__ import annotations

import torch
from vllm_parity import (
    assert_bf16_accurate,
    assert_greedy_parity,
    chosen,
    float32_copy,
    requires_vllm,
    run_config,
    teacher_forced_logprobs,
)

from refine.algorithm.rollout import snapshot_rollouts

pytestmark = requires_vllm


def test_rollouts_never_sample_eos_and_report_unmasked_logprobs(engine, documents):
    ids, lengths = documents
    saved_refine, config = engine.config.refine, engine.policy.config
    # The test models have no EOS: make the token they pick most often greedily their EOS.
    plain = engine.rollout(ids, lengths, torch.Generator().manual_seed(0))
    eos = int(torch.bincount(plain.tokens.flatten()).argmax())
    assert int((plain.tokens == eos).sum()) >= 2
    config.eos_token_id = eos
    try:
        # Greedy: the next-best token wherever EOS is the argmax, as the snapshot engine decodes.
        cfg = engine.config.refine
        out = engine.rollout(ids, lengths, torch.Generator().manual_seed(0), positions=plain.positions)
        assert not bool((out.tokens == eos).any()), "the vLLM engine sampled EOS inside a rollout"
        snap = snapshot_rollouts(engine.policy, ids, lengths, cfg, None, positions=out.positions)
        assert not bool((snap.tokens == eos).any())
        reference32 = teacher_forced_logprobs(float32_copy(engine.policy), ids, lengths, out.positions, out.tokens,
                                              cfg.num_samples)
        assert_greedy_parity(out.tokens, snap.tokens, reference32.index_fill(-1, torch.tensor([eos]), -torch.inf))
        # Log-probs of the unmasked distribution (the convention), as the snapshot engine reports them:
        # vLLM's renormalized ones are -log(1 - p(EOS)) higher: about a nat where EOS was the argmax.
        same = (out.tokens == snap.tokens).all(-1)
        expected = chosen(reference32, out.tokens)
        assert_bf16_accurate(out.logprobs[same], expected[same], snap.logprobs[same], "greedy with EOS suppressed")
        masked = (reference32.argmax(-1) == eos) & same[:, None]  # steps where EOS was the model's choice
        assert bool(masked.any())
        assert_bf16_accurate(out.logprobs[masked], expected[masked], snap.logprobs[masked], "where EOS was the argmax")

        # Sampled: never EOS either, log-probs of the unmasked tempered distribution.
        engine.config.refine = cfg = run_config(config.model_type, temperature=0.7, num_samples=3).refine
        out = engine.rollout(ids, lengths, torch.Generator().manual_seed(5), positions=plain.positions)
        assert not bool((out.tokens == eos).any()), "the vLLM engine sampled EOS inside a rollout"
        args = (ids, lengths, out.positions, out.tokens, cfg.num_samples)
        reference32 = teacher_forced_logprobs(float32_copy(engine.policy), *args, temperature=cfg.temperature)
        reference16 = teacher_forced_logprobs(engine.policy, *args, temperature=cfg.temperature)
        assert_bf16_accurate(out.logprobs, chosen(reference32, out.tokens), chosen(reference16, out.tokens),
                             "sampled with EOS suppressed")
    finally:
        config.eos_token_id = None
        engine.config.refine = saved_refine


def test_answers_may_still_end_with_eos(engine, documents):
    """Only rollouts suppress EOS: answers stop at the eos_id they are given."""
    ids, _ = documents
    answer = engine.generate(ids[:1, :200], 30)[0]
    eos = answer[5]
    engine.policy.config.eos_token_id = eos
    try:
        assert engine.generate(ids[:1, :200], 30, eos_id=eos)[0] == answer[:answer.index(eos)]
    finally:
        engine.policy.config.eos_token_id = None
