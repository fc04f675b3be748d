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
    # Documents of data.seq_len tokens plus a rollout must fit: refused at the start, not on every rollout.
    with pytest.raises(ValueError, match=r"data.seq_len=512 exceeds rollout.vllm.max_model_len=256"):
        VllmEngine(run_config("delta_net"), VllmEngineConfig(max_model_len=256))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a limit of vLLM's CPU kernels")
def test_cpu_kernels_refuse_unequal_key_and_value_head_dims():
    from refine_vllm.layers import check_platform
    from rollout_workers.vllm_engine import VllmEngine

    # fla's Gated DeltaNet default expand_v=2: value heads twice as wide as key heads.
    model = {k: v for k, v in MODELS["gated_deltanet"].items() if k != "expand_v"}
    message = r"head_k_dim=64 != head_v_dim=128 \(from model.head_dim=64, model.expand_v=2.0\)"
    with pytest.raises(ValueError, match=message.replace("model.", "")):
        check_platform(build_model(model).config, torch.bfloat16)
    config = run_config("gated_deltanet")
    config = config.model_copy(update={"model": build_model(model).config})
    with pytest.raises(ValueError, match=message):
        VllmEngine(config)  # before vLLM starts


def test_sigmoid_output_gate_reaches_vllms_layer():
    from refine_vllm.layers import layer_config

    config = build_model({**MODELS["gated_deltanet"], "output_gate_activation": "sigmoid"}).config
    assert layer_config(config).output_gate_type == "sigmoid"
    assert layer_config(build_model(MODELS["gated_deltanet"]).config).output_gate_type in ("swish", "silu")


def test_every_worker_seeds_vllm_differently():
    from rollout_workers.vllm_engine import _engine_seed

    assert _engine_seed(0, "rollout-0") == _engine_seed(0, "rollout-0")
    assert len({_engine_seed(0, "rollout-0"), _engine_seed(0, "rollout-1"), _engine_seed(1, "rollout-0"),
                _engine_seed(0, None)}) == 4
    assert 0 <= _engine_seed(2**64 - 1, None) < 2**31


def test_the_chat_template_warmup_warning_is_dropped_once_an_engine_started(engine):
    """vLLM, started without a tokenizer, always fails its chat-template warmup and logs the traceback as a
    warning; the engine drops that one record from vLLM's renderer logger (the name must be vLLM's own)."""
    import logging

    import vllm.renderers.base as renderers

    warmup = logging.LogRecord(renderers.logger.name, logging.WARNING, __file__, 1, "Chat template warmup failed",
                               None, None)
    other = logging.LogRecord(renderers.logger.name, logging.WARNING, __file__, 1, "something else", None, None)
    assert renderers.logger.filter(warmup) is False
    assert renderers.logger.filter(other)
