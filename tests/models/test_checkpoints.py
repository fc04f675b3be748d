"""Checkpoint directories move between flash-linear-attention's classes and ours without conversion."""

import json

import pytest
import torch

from refine.models import build_model, load_model, save_model

fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention is a dev dependency")

CASES = [
    ("delta_net", dict(use_short_conv=True, use_gate=False)),
    ("delta_net", dict(use_short_conv=False, use_gate=True)),
    ("delta_net", dict(use_short_conv=True, use_gate=True, tie_word_embeddings=True)),
    ("gated_deltanet", dict(use_short_conv=True, use_gate=True, head_dim=16)),
    ("gated_deltanet", dict(use_short_conv=False, use_gate=False, head_dim=16)),
    ("gated_deltanet", dict(use_short_conv=True, use_gate=True, head_dim=16, num_v_heads=4)),
]


def _fla_model(model_type, overrides):
    common = dict(hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=60, intermediate_size=48)
    if model_type == "delta_net":
        return fla_models.DeltaNetForCausalLM(fla_models.DeltaNetConfig(**common, **overrides))
    return fla_models.GatedDeltaNetForCausalLM(fla_models.GatedDeltaNetConfig(**common, **overrides))


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_fla_checkpoint_loads_with_every_key(tmp_path, model_type, overrides):
    torch.manual_seed(0)
    reference = _fla_model(model_type, overrides)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, msg=name)


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_our_checkpoint_loads_into_fla(tmp_path, model_type, overrides):
    torch.manual_seed(1)
    config = dict(model_type=model_type, hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=60,
                  intermediate_size=48, **overrides)
    ours = build_model(config)
    save_model(ours, tmp_path)
    cls = fla_models.DeltaNetForCausalLM if model_type == "delta_net" else fla_models.GatedDeltaNetForCausalLM
    theirs, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[name], tensor, msg=name)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    ours = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=60))
    save_model(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing=.*model.layers.1"):
        load_model(tmp_path)


def test_bad_config_value_names_field():
    with pytest.raises(ValueError, match="num_heads"):
        build_model(dict(model_type="delta_net", hidden_size=30, num_heads=4, num_hidden_layers=1, vocab_size=10))
    with pytest.raises(ValueError, match="model_type='mamba'"):
        build_model(dict(model_type="mamba"))
