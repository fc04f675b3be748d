"""The transformers config classes vLLM reads our checkpoints' config.json through (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from refine_vllm.hf_config import HF_CONFIGS, refine_config


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_a_config_json_with_few_fields_loads_with_flas_defaults_filled_in(tmp_path, model_type):
    AutoConfig.register(model_type, HF_CONFIGS[model_type], exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 40}))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, HF_CONFIGS[model_type])
    # fla's defaults, which vLLM reads: heads under transformers' name, tied embeddings, special ids.
    expected = refine_config(loaded)
    assert loaded.num_attention_heads == expected.num_heads
    assert (loaded.tie_word_embeddings, loaded.bos_token_id, loaded.eos_token_id) == (
        expected.tie_word_embeddings, expected.bos_token_id, expected.eos_token_id)
    assert loaded.hidden_size == 64 and loaded.vocab_size == 40


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_a_config_our_models_refuse_is_refused_when_loaded(model_type):
    with pytest.raises(ValueError, match="num_hidden_layers"):
        HF_CONFIGS[model_type](hidden_size=64, num_hidden_layers=0, vocab_size=40)
