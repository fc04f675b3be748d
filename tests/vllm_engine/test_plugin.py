"""The vLLM plugin: entry point, registration, config parsing and the variants it refuses."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from vllm_parity import MODELS, requires_vllm, run_config

from refine.models import build_model, save_model

pytestmark = requires_vllm


def test_entry_point_registers_the_plugin_in_every_vllm_process():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("refine") == "refine_vllm:register"


def test_register_makes_our_architectures_and_configs_known(tmp_path):
    import refine_vllm
    from transformers import AutoConfig
    from vllm import ModelRegistry

    refine_vllm.register()
    refine_vllm.register()  # vLLM may call it again in the same process
    assert {"DeltaNetForCausalLM", "GatedDeltaNetForCausalLM"} <= set(ModelRegistry.get_supported_archs())
    save_model(build_model(MODELS["gated_deltanet"]), tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "gated_deltanet"
    assert loaded.num_attention_heads == loaded.num_heads == 2
    assert loaded.head_dim == 64


@pytest.mark.parametrize("field, value, model_type", [
    ("allow_neg_eigval", True, "gated_deltanet"),
    ("use_short_conv", False, "delta_net"),
    ("qk_norm", "sum", "delta_net"),
    ("qk_activation", "relu", "delta_net"),
])
def test_variants_vllm_cannot_compute_are_refused_by_name(field, value, model_type):
    from refine_vllm.layers import check_servable

    config = build_model({**MODELS[model_type], field: value}).config
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        check_servable(config)


def test_engine_refuses_what_it_cannot_serve():
    from rollout_workers.vllm_engine import VllmEngine, VllmEngineConfig

    lact = run_config("delta_net").model_copy(update={"model": build_model(dict(
        model_type="lact_swiglu", vocab_size=64, hidden_size=64, num_hidden_layers=1, num_heads=2)).config})
    with pytest.raises(ValueError, match="model_type='lact_swiglu'"):
        VllmEngine(lact)
    with pytest.raises(ValueError, match="top_p"):
        VllmEngine(run_config("delta_net", temperature=1.0, top_p=0.9), VllmEngineConfig())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="rollout.vllm.dtype='float32'"):
            VllmEngine(run_config("delta_net"), VllmEngineConfig(dtype="float32"))
    with pytest.raises(ValueError, match="max_num_batched_tokens=32"):
        VllmEngineConfig(max_num_batched_tokens=32, max_num_seqs=64)
