"""Helpers of the vLLM engine tests: test models, tolerances and the parity assertions."""

from __future__ import annotations

import pytest
import torch

from refine.algorithm.rollout import prefix_rows
from refine.config import RunConfig
from rollout_workers.vllm_engine import vllm_available

SKIP_REASON = ("vLLM is not installed in this environment: create it with `bash scripts/setup_vllm_env.sh` "
               "and run `.venv-vllm/bin/python -m pytest tests/vllm_engine`")
requires_vllm = pytest.mark.skipif(not vllm_available(), reason=SKIP_REASON)

# Tiny models at the limits vLLM's CPU delta-rule kernels accept: bfloat16, head dim 64 (one with
# tied embeddings, one without). A wide initialization gives peaked next-token distributions, so
# greedy choices are rarely bf16 ties. No EOS id (neither engine samples EOS inside a rollout;
# test_eos gives them one).
MODELS = {
    "delta_net": dict(model_type="delta_net", vocab_size=260, hidden_size=128, num_hidden_layers=2, num_heads=2,
                      intermediate_size=256, initializer_range=0.5, tie_word_embeddings=True, eos_token_id=None),
    "gated_deltanet": dict(model_type="gated_deltanet", vocab_size=260, hidden_size=128, num_hidden_layers=2,
                           num_heads=2, head_dim=64, expand_v=1.0, intermediate_size=256, initializer_range=0.5,
                           eos_token_id=None),
}
# Small enough that every prefix is prefilled in several chunks.
CHUNK_TOKENS = 64


def run_config(model_type: str, **refine) -> RunConfig:
    # Greedy by default (parity to the token); GRPO groups by document, which greedy samples of a position allow.
    values = {**dict(num_chunks=4, rollout_len=6, num_samples=2, temperature=0.0, group_by="document"), **refine}
    return RunConfig.model_validate(dict(model=MODELS[model_type], train=dict(dtype="bfloat16", seed=0),
                                         refine=values))


def float32_copy(model):
    """The same weights in float32: the reference both bf16 engines are measured against."""
    from refine.models import build_model

    ref = build_model(model.config).eval()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return ref


@torch.no_grad()
def teacher_forced_logprobs(model, ids, lengths, positions, tokens, num_samples, temperature=1.0) -> torch.Tensor:
    """log_softmax(logits / T) [N, k, V] of `model` along given rollout tokens from the given positions."""
    doc = model(ids, lengths=lengths, output_state=False, defer_states=True)
    rows, starts = prefix_rows(positions)
    first = doc.logits[rows, starts - 1].repeat_interleave(num_samples, dim=0)
    forced = model(tokens, state=doc.states_at(positions).expand(num_samples), output_state=False)
    logits = torch.cat([first[:, None], forced.logits[:, :-1]], dim=1).float()
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)


# Log-probs of these models (logits reach ~10) carry bf16 rounding of up to ~0.35 nats: our own
# bf16 model differs from its float32 copy by that much. Two bf16 implementations may therefore
# order two tokens differently when their float32 log-probs are closer than twice that: such a
# step is a tie, where either greedy choice is right.
TIE = 0.7


def assert_greedy_parity(vllm_tokens: torch.Tensor, our_tokens: torch.Tensor, reference: torch.Tensor,
                         min_agreement: float = 0.5) -> None:
    """Identical greedy tokens up to the first bf16 tie of each row; at a tie vLLM takes a top choice.

    reference: [N, k, V] float32 log-probs of our model along vLLM's tokens. After a tie the two paths
    may continue differently (different contexts), so only the steps before it are compared.
    """
    chosen = reference.gather(-1, vllm_tokens[..., None])[..., 0]
    regret = reference.max(-1).values - chosen
    assert regret.max() <= TIE, f"vLLM picked a token {regret.max():.3f} nats below the argmax"
    top2 = reference.topk(2, dim=-1).values
    tie = (top2[..., 0] - top2[..., 1]) < TIE
    steps = torch.arange(tie.shape[-1])
    first_tie = torch.where(tie.any(-1), tie.float().argmax(-1), torch.tensor(tie.shape[-1]))
    before_tie = steps[None, :] < first_tie[:, None]
    mismatch = (vllm_tokens != our_tokens) & before_tie
    assert not bool(mismatch.any()), f"tokens differ before any tie at (row, step) {mismatch.nonzero().tolist()}"
    agreement = (vllm_tokens == our_tokens).float().mean()
    assert agreement >= min_agreement, f"only {agreement:.2f} of greedy tokens agree (bf16 ties too frequent)"


def chosen(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[N, k, V] log-probs -> [N, k] at the given tokens."""
    return logprobs.gather(-1, tokens[..., None])[..., 0]


def assert_bf16_accurate(logprobs: torch.Tensor, reference32: torch.Tensor, reference16: torch.Tensor,
                         what: str) -> None:
    """vLLM's log-probs are as close to the float32 model as our own bf16 model's (the snapshot engine's).

    All three are [N, k] log-probs of the same tokens; the bound adapts to how much bf16 rounding
    these tokens' log-probs carry (more for unlikely tokens and low temperatures).
    """
    err = (logprobs.float() - reference32.float()).abs()
    ours = (reference16.float() - reference32.float()).abs()
    assert err.mean() <= 1.5 * ours.mean() + 0.01, f"{what}: mean error {err.mean():.4f} vs ours {ours.mean():.4f}"
    assert err.max() <= 2 * ours.max() + 0.1, f"{what}: max error {err.max():.3f} vs ours {ours.max():.3f}"
