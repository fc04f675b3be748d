"""On CPU: our DeltaNet and Gated DeltaNet models give the logits of flash-linear-attention's own model
classes on the same weights, config variant by config variant.

fla's layers, blocks and models run unchanged; only their Triton kernels are swapped, under the name
fla's code looks them up by (the layer module's import, or the module of the class that calls them),
for fla's own PyTorch references:

  delta rule           fla.ops.delta_rule.naive.delta_rule_recurrence / delta_rule_chunkwise
  gated delta rule     fla.ops.gated_delta_rule.naive_recurrent_gated_delta_rule / naive_chunk_gated_delta_rule,
                       with the in-kernel gate from fla.ops.gated_delta_rule.gate.naive_gdn_gate
  RMSNorm              fla.modules.norm.layernorm.rms_norm_ref
  FusedRMSNormGated    fla.modules.norm.layernorm_gated.rms_norm_ref (swish gate)

fla ships no PyTorch version of four pieces, written here from the math of its kernels (see each one):
the q/k L2 norm, the sigmoid output gate, the causal short convolution and SwiGLU. fla's references
compute in float32 whatever they are given, so the comparison runs in float32.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from refine.models import build_model, save_model

fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention is a dev dependency")
import fla.layers.delta_net as fla_delta_net  # noqa: E402
import fla.layers.gated_deltanet as fla_gated_deltanet  # noqa: E402
import fla.modules.activations.ops as fla_activations  # noqa: E402
import fla.modules.causal_conv1d.ops as fla_conv  # noqa: E402
import fla.modules.norm.fused_norm_gate as fla_norm_gate  # noqa: E402
import fla.modules.norm.layernorm as fla_layernorm  # noqa: E402
from fla.modules.norm.layernorm_gated import rms_norm_ref as fla_gated_rms_norm_ref  # noqa: E402
from fla.ops.delta_rule.naive import delta_rule_chunkwise, delta_rule_recurrence  # noqa: E402
from fla.ops.gated_delta_rule import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule  # noqa: E402
from fla.ops.gated_delta_rule.gate import naive_gdn_gate  # noqa: E402

# fla warns on every layer built with use_short_conv=False, which several variants are.
pytestmark = pytest.mark.filterwarnings("ignore:ShortConvolution is crucial:UserWarning")

COMMON = dict(hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=60, intermediate_size=48)

CASES = {
    # the variants of tests/models/test_checkpoint_interop.py
    "dn-conv": ("delta_net", dict(use_short_conv=True, use_gate=False)),
    "dn-noconv-gate": ("delta_net", dict(use_short_conv=False, use_gate=True)),
    "dn-conv-gate-tied": ("delta_net", dict(use_short_conv=True, use_gate=True, tie_word_embeddings=True)),
    "gdn-conv-gate": ("gated_deltanet", dict(use_short_conv=True, use_gate=True, head_dim=16)),
    "gdn-noconv-nogate": ("gated_deltanet", dict(use_short_conv=False, use_gate=False, head_dim=16)),
    "gdn-grouped": ("gated_deltanet", dict(use_short_conv=True, use_gate=True, head_dim=16, num_v_heads=4)),
    "gdn-gate-silu": ("gated_deltanet", dict(use_gate=True, head_dim=16, output_gate_activation="silu")),
    "gdn-gate-sigmoid": ("gated_deltanet", dict(use_gate=True, head_dim=16, output_gate_activation="sigmoid")),
    # DeltaNet's q/k feature maps and normalizations, beta, and sizes
    "dn-relu": ("delta_net", dict(qk_activation="relu")),
    "dn-elu": ("delta_net", dict(qk_activation="elu", use_gate=True)),
    "dn-identity": ("delta_net", dict(qk_activation="identity")),
    "dn-noconv-relu": ("delta_net", dict(use_short_conv=False, qk_activation="relu")),
    "dn-sum-norm": ("delta_net", dict(qk_norm="sum")),
    "dn-elu-sum-norm": ("delta_net", dict(qk_activation="elu", qk_norm="sum")),
    "dn-neg-eigval": ("delta_net", dict(allow_neg_eigval=True, use_gate=True)),
    "dn-no-beta": ("delta_net", dict(use_beta=False)),
    "dn-no-beta-neg-eigval": ("delta_net", dict(use_beta=False, allow_neg_eigval=True)),
    "dn-expand-conv3": ("delta_net", dict(expand_k=0.5, expand_v=2.0, conv_size=3, use_gate=True)),
    "dn-no-output-norm": ("delta_net", dict(use_output_norm=False)),  # a field that neither layer reads
    "dn-fused-recurrent-mode": ("delta_net", dict(attn_mode="fused_recurrent")),
    # Gated DeltaNet's grouped value heads, gates and sizes
    "gdn-grouped-nogate": ("gated_deltanet", dict(head_dim=16, num_v_heads=4, use_gate=False)),
    "gdn-grouped-noconv": ("gated_deltanet", dict(head_dim=16, num_v_heads=4, use_short_conv=False)),
    "gdn-neg-eigval": ("gated_deltanet", dict(head_dim=16, allow_neg_eigval=True)),
    "gdn-grouped-neg-eigval-sigmoid": ("gated_deltanet", dict(head_dim=16, num_v_heads=4, allow_neg_eigval=True,
                                                              output_gate_activation="sigmoid")),
    "gdn-expand1-conv3": ("gated_deltanet", dict(head_dim=16, expand_v=1.0, conv_size=3)),
    "gdn-fused-recurrent-mode": ("gated_deltanet", dict(head_dim=16, attn_mode="fused_recurrent")),
}

# Without autograd, fla's layers run their fused_recurrent kernel on inputs of up to 64 tokens and the
# config's attn_mode (chunk by default) on longer ones: both lengths, both code paths.
SEQ_LENS = (45, 70)


def _l2norm(x, eps=1e-6):
    # No PyTorch l2norm in fla: its kernels (l2norm_fwd_kernel, and inline in the fused recurrent gated
    # delta rule) compute x / sqrt(sum(x^2) + 1e-6).
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _delta_rule(calls, name, q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
    """fla's chunk_delta_rule / fused_recurrent_delta_rule ([B, T, H, ...]) through its naive references
    (head-first [B, H, T, ...])."""
    assert scale is None and cu_seqlens is None and not kwargs, "not a call DeltaNet's layer makes here"
    calls.append(name)
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q, k, v, beta = (t.transpose(1, 2) for t in (q, k, v, beta))
    if name == "fused_recurrent":
        o, state = delta_rule_recurrence(q, k, v, beta, initial_state, output_final_state)
    else:  # the chunkwise reference takes whole chunks and no initial state; zero padding is inert
        assert initial_state is None
        length, pad = q.shape[2], -q.shape[2] % 32
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        o, state = delta_rule_chunkwise(q, k, v, F.pad(beta, (0, pad)), chunk_size=32)
        o = o[:, :, :length]
    return o.transpose(1, 2), state if output_final_state else None


def _gated_delta_rule(calls, name, q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                      state_v_first=False, cu_seqlens=None, use_gate_in_kernel=False, A_log=None, dt_bias=None,
                      **kwargs):
    """fla's chunk_gated_delta_rule / fused_recurrent_gated_delta_rule through its naive references, with
    the in-kernel steps those take ready-made done first, as the kernels' docstrings describe them."""
    assert cu_seqlens is None and not kwargs, "not a call Gated DeltaNet's layer makes here"
    calls.append(name)
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    if use_gate_in_kernel:  # g = -exp(A_log) * softplus(g + dt_bias)
        g = naive_gdn_gate(g, A_log, dt_bias)
    if use_beta_sigmoid_in_kernel:  # beta = sigmoid(beta), 2 * sigmoid(beta) with allow_neg_eigval
        beta = beta.sigmoid() * (2 if allow_neg_eigval else 1)
    # Grouped value heads: value head i reads q/k head i // (HV // H) (i_h = i_hv // (HV // H) in the kernels).
    group = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    if name == "fused_recurrent":
        o, state = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state)
    else:
        o, state = naive_chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                                output_final_state=output_final_state)
    if state is not None and state_v_first:
        state = state.transpose(-1, -2)
    return o.to(v.dtype), state


def _causal_conv1d(x, weight=None, bias=None, residual=None, initial_state=None, output_final_state=False,
                   activation=None, backend=None, cu_seqlens=None, **kwargs):
    # No PyTorch causal_conv1d in fla: its kernel is y_t = sum_i w[:, i] * x_{t - W + 1 + i} (zeros before
    # the start), + bias, then silu/swish when asked (causal_conv1d_fwd_kernel).
    assert residual is None and initial_state is None and not output_final_state and cu_seqlens is None
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0])
    y = y.transpose(1, 2)
    return (F.silu(y) if activation in ("silu", "swish") else y), None


def _rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    # residual_in_fp32 only changes the dtype of the returned residual: float32 here anyway.
    return fla_layernorm.rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm)


def _rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False, residual_in_fp32=False,
                    eps=1e-6):
    assert residual is None and not prenorm, "not a call the layers' output norms make"
    if activation in ("swish", "silu"):
        return fla_gated_rms_norm_ref(x, weight, bias, z=g, eps=eps, norm_before_gate=True)
    # No sigmoid-gate reference in fla: its kernel multiplies the normalized row by sigmoid(g)
    # (layer_norm_gated_fwd_kernel, ACTIVATION == "sigmoid").
    return fla_layernorm.rms_norm_ref(x, weight, bias, eps=eps) * torch.sigmoid(g)


def _swiglu_fwd(x, y, output_contiguous=False):
    # No PyTorch SwiGLU in fla: swish(x) * y, as SwiGLUFunction's docstring states.
    return F.silu(x) * y


def _run_fla_on_torch(monkeypatch) -> list[str]:
    """Swap fla's Triton entry points for the functions above; returns the list of delta-rule calls."""
    calls: list[str] = []
    for module, rule in ((fla_delta_net, _delta_rule), (fla_gated_deltanet, _gated_delta_rule)):
        prefix = "" if module is fla_delta_net else "gated_"
        for mode in ("chunk", "fused_recurrent"):
            monkeypatch.setattr(module, f"{mode}_{prefix}delta_rule", functools.partial(rule, calls, mode))
    monkeypatch.setattr(fla_conv, "causal_conv1d", _causal_conv1d)  # what ShortConvolution.forward calls
    monkeypatch.setattr(fla_gated_deltanet, "causal_conv1d", _causal_conv1d)  # GatedDeltaNet's fused q/k/v conv
    monkeypatch.setattr(fla_layernorm, "rms_norm", _rms_norm)  # RMSNorm.forward (o_norm; the blocks' fuse_norm)
    monkeypatch.setattr(fla_norm_gate, "rms_norm_gated", _rms_norm_gated)  # FusedRMSNormGated.forward
    monkeypatch.setattr(fla_activations, "swiglu_fwd", _swiglu_fwd)  # inside fla's SwiGLU(Linear)Function
    return calls


def _randomize(model: torch.nn.Module) -> None:
    """Weights far from the initialization, so that every parameter moves the logits."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):  # decay rates A from 0.4 to 4.5
                values = torch.empty(p.shape).uniform_(-1.0, 1.5, generator=gen)
            elif name.endswith("dt_bias"):
                values = torch.randn(p.shape, generator=gen)
            elif p.dim() == 1:  # norm weights
                values = torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen)
            elif "conv1d" in name:
                values = 0.5 * torch.randn(p.shape, generator=gen)
            else:  # projections and embeddings
                values = torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
            p.copy_(values)


def _ours_and_fla(tmp_path, model_type: str, overrides: dict):
    """Our model with random weights, and fla's class loaded from the directory we save it to."""
    torch.manual_seed(0)
    ours = build_model(dict(model_type=model_type, **COMMON, **overrides), dtype=torch.float32)
    _randomize(ours)
    save_model(ours, tmp_path)
    cls = fla_models.DeltaNetForCausalLM if model_type == "delta_net" else fla_models.GatedDeltaNetForCausalLM
    theirs, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for key, value in overrides.items():
        assert getattr(theirs.config, key) == value, key
    for name, tensor in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], tensor), name
    return ours.eval(), theirs.float().eval()


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("model_type,overrides", CASES.values(), ids=CASES.keys())
def test_logits_match_fla_layer_code_on_cpu(tmp_path, monkeypatch, model_type, overrides, seq_len):
    calls = _run_fla_on_torch(monkeypatch)
    ours, theirs = _ours_and_fla(tmp_path, model_type, overrides)
    ids = torch.randint(0, COMMON["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        expected = theirs(input_ids=ids, use_cache=False).logits
        got = ours(ids, output_state=False).logits
    # The fla code path this length takes: its chunk kernel past 64 tokens unless attn_mode says otherwise.
    mode = "chunk" if seq_len > 64 and overrides.get("attn_mode", "chunk") == "chunk" else "fused_recurrent"
    assert calls == [mode] * COMMON["num_hidden_layers"]
    assert expected.abs().max() > 1.0  # logits of order 1: the tolerance below is relative to them
    # float32 rounding alone: against float64 each model is off by up to 1.4e-4 here, and with float64
    # copies of fla's references the two agree to 1e-13 in every case. In float32 they differ by at
    # most 2.7e-5, 0.41 of this tolerance; doubling beta or the decay in our layers moves them by 0.4 or more.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=5e-5)
