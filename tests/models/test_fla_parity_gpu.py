"""On an NVIDIA GPU: our models give the logits of flash-linear-attention's own models on the same weights."""

import pytest
import torch

from refine.models import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: fla's model forward runs only through its Triton kernels"),
]


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet"])
def test_logits_match_fla_model(tmp_path, model_type):
    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention is a dev dependency")
    torch.manual_seed(0)
    common = dict(hidden_size=256, num_heads=4, num_hidden_layers=2, vocab_size=1000, fuse_cross_entropy=False)
    if model_type == "delta_net":
        # fla's chunk delta rule refuses float32; its fused_recurrent mode runs the same rule in float32.
        reference = fla_models.DeltaNetForCausalLM(
            fla_models.DeltaNetConfig(**common, use_gate=True, attn_mode="fused_recurrent"))
    else:
        reference = fla_models.GatedDeltaNetForCausalLM(fla_models.GatedDeltaNetConfig(**common, head_dim=64))
    reference = reference.cuda().float().eval()
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, device="cuda").eval()
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
        got = ours(ids, output_state=False).logits
    scale = expected.abs().max()
    assert (got - expected).abs().max() / scale < 2e-2
    # States from our torch kernels (requested positions) give the same logits as fla's final-state path.
    with torch.no_grad():
        carried = ours(ids[:, 150:], state=ours(ids[:, :150]).state, output_state=False).logits
    assert (carried - got[:, 150:]).abs().max() / scale < 2e-2


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet"])
@pytest.mark.parametrize("carried", [False, True], ids=["fresh", "carried_state"])
def test_final_state_forwards_through_fla_match_torch_kernels(monkeypatch, model_type, carried):
    """Forwards that want only the final state (prefill, decoding) run fla's kernels: the same logits and
    states as our torch kernels, from a fresh and from a carried state."""
    from refine.kernels import dispatch
    from refine.models import build_model

    if dispatch._fla_ops() is None:
        pytest.skip("flash-linear-attention with triton is not importable on this CUDA machine")
    torch.manual_seed(0)
    config = dict(model_type=model_type, hidden_size=256, num_heads=4, num_hidden_layers=2, vocab_size=1000)
    if model_type == "gated_deltanet":
        config["head_dim"] = 64
    model = build_model(config, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    results = {}
    for kernel in ("fla", "torch"):
        monkeypatch.setenv(dispatch.KERNEL_ENV, kernel)  # fla: an error if any call could not go to fla
        with torch.no_grad():
            state = model(ids[:, :200]).state if carried else None
            out = model(ids[:, 200:], state=state)
            step = model(ids[:, :1], state=out.state)  # one decoding step from the carried state
        results[kernel] = (out, step)
    (out, step), (out_ref, step_ref) = results["fla"], results["torch"]
    for got, want in ((out, out_ref), (step, step_ref)):
        scale = want.logits.float().abs().max()
        assert (got.logits.float() - want.logits.float()).abs().max() / scale < 4e-2
        for layer, layer_ref in zip(got.state.layers, want.state.layers):
            for name, tensor in layer.items():
                assert tensor.dtype == layer_ref[name].dtype, name
                reference = layer_ref[name].float()
                assert (tensor.float() - reference).norm() / reference.norm() < 4e-2, name
