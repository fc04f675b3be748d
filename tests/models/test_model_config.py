"""Model configs refuse what the models cannot build, naming the field and the value."""

import re
import warnings
from typing import Literal

import pytest
import torch
from pydantic import ValidationError

from refine.models import build_model, config_from_dict
from refine.models.config import MAX_EXPAND, MAX_INITIALIZER_RANGE, MAX_NORM_EPS, ModelConfigBase
from refine.models.lact import MAX_FW_INIT_GAIN

DELTA_NET = dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=50)
GATED_DELTANET = dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=1,
                      vocab_size=50, intermediate_size=48)


@pytest.mark.parametrize("base,field,value", [
    (DELTA_NET, "hidden_ratio", 0),
    (DELTA_NET, "hidden_ratio", -1),
    (DELTA_NET, "intermediate_size", 0),
    (DELTA_NET, "intermediate_size", -8),
    (DELTA_NET, "expand_k", 0.0),
    (DELTA_NET, "expand_v", -1.0),
    (GATED_DELTANET, "expand_v", 0.0),
    (GATED_DELTANET, "num_v_heads", 0),  # not read as "same as num_heads"
    (GATED_DELTANET, "num_v_heads", -2),
])
def test_non_positive_size_is_refused_by_name(base, field, value):
    with pytest.raises(ValidationError, match=rf"{field}\n  Input should be greater than 0 .*input_value={value}"):
        config_from_dict({**base, field: value})


@pytest.mark.parametrize("field,value,match", [
    ("attn", {"layers": [0], "num_heads": 2}, r"attn=\{'layers': \[0\], 'num_heads': 2\} is not supported \(hybrid"),
    ("attnres_block_size", 2, r"attnres_block_size=2 is not supported \(attention residuals"),
    ("attnres_block_size", 1, r"attnres_block_size=1 is not supported"),
])
@pytest.mark.parametrize("base", [DELTA_NET, GATED_DELTANET], ids=["delta_net", "gated_deltanet"])
def test_fla_field_that_changes_the_network_is_refused(base, field, value, match):
    with pytest.raises(ValidationError, match=match):
        config_from_dict({**base, field: value})


def test_other_hidden_act_is_refused_by_name():
    with pytest.raises(ValidationError, match=r"hidden_act\n  Input should be 'swish' .*input_value='powlu'"):
        config_from_dict({**DELTA_NET, "hidden_act": "powlu"})


def test_null_fla_fields_and_bookkeeping_extras_are_kept():
    extras = dict(attn=None, attnres_block_size=None, fuse_norm=False, fuse_swiglu=True, use_l2warp=False)
    saved = config_from_dict({**DELTA_NET, **extras}).to_json_dict()
    assert {name: saved[name] for name in extras} == extras


def _logits(output_gate_activation: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model({**GATED_DELTANET, "output_gate_activation": output_gate_activation}, dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def test_gated_deltanet_runs_with_each_output_gate_activation():
    swish, silu, sigmoid = (_logits(name) for name in ("swish", "silu", "sigmoid"))
    assert swish.shape == (2, 7, 50) and sigmoid.isfinite().all()
    torch.testing.assert_close(silu, swish, rtol=0, atol=0)  # two names of one function
    assert not torch.allclose(sigmoid, swish)  # same weights: only the gate differs


def _fla_or_skip(module: str):
    return pytest.importorskip(module, reason="flash-linear-attention is a dev dependency")


@pytest.mark.parametrize("config", [
    dict(model_type="delta_net", hidden_size=100, num_heads=2, expand_k=1.1),  # 110.00000000000001
    dict(model_type="delta_net", hidden_size=100, num_heads=2, expand_v=1.1),
    dict(model_type="gated_deltanet", hidden_size=32, num_heads=1, head_dim=100, expand_v=1.1),
    dict(model_type="gated_deltanet", hidden_size=32, num_heads=1, num_v_heads=2, head_dim=100, expand_v=1.1),
])
def test_head_sizes_fla_rounds_build_with_fla_shapes(config):
    """fla accepts a product that math.isclose calls an integer (and rounds it): so do we, to the same shapes."""
    fla_layers = _fla_or_skip("fla.layers")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    if config["model_type"] == "delta_net":
        reference = fla_layers.DeltaNet(**fields)
    else:
        reference = fla_layers.GatedDeltaNet(**fields)
    ours = build_model(dict(config, num_hidden_layers=1, vocab_size=10, intermediate_size=16)).model.layers[0].attn
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == \
        {n: tuple(p.shape) for n, p in reference.named_parameters()}


@pytest.mark.parametrize("config,field", [
    (dict(DELTA_NET, hidden_size=20, expand_k=0.58), "expand_k"),  # 11.6
    (dict(GATED_DELTANET, head_dim=20, expand_v=0.58), "expand_v"),
])
def test_head_sizes_fla_refuses_are_refused(config, field):
    with pytest.raises(ValidationError, match=f"{field} = 11.6"):
        config_from_dict(config)


def test_defaults_equal_fla_defaults():
    """Every field both configs have defaults to fla's value (a config.json without it means fla's default)."""
    fla_models = _fla_or_skip("fla.models")
    for ours, theirs in ((config_from_dict(dict(model_type="delta_net")), fla_models.DeltaNetConfig()),
                         (config_from_dict(dict(model_type="gated_deltanet")), fla_models.GatedDeltaNetConfig())):
        fla_values = theirs.to_dict()
        shared = [name for name in type(ours).model_fields if name in fla_values]
        assert len(shared) > 20, shared  # the comparison reads the fields, not an empty overlap
        differing = {name: (getattr(ours, name), fla_values[name]) for name in shared
                     if getattr(ours, name) != fla_values[name]}
        assert differing == {}, f"{ours.model_type}: ours vs fla's {differing}"


LACT = dict(model_type="lact_swiglu", hidden_size=32, num_attn_heads=2, num_lact_heads=2, num_hidden_layers=1,
            vocab_size=50, lact_chunk_size=8, window_size=8)


@pytest.mark.parametrize("base,field,limit", [
    (DELTA_NET, "initializer_range", MAX_INITIALIZER_RANGE),
    (DELTA_NET, "norm_eps", MAX_NORM_EPS),
    (DELTA_NET, "expand_k", MAX_EXPAND),
    (DELTA_NET, "expand_v", MAX_EXPAND),
    (GATED_DELTANET, "initializer_range", MAX_INITIALIZER_RANGE),
    (GATED_DELTANET, "norm_eps", MAX_NORM_EPS),
    (GATED_DELTANET, "expand_v", MAX_EXPAND),
    (LACT, "norm_eps", MAX_NORM_EPS),
    (LACT, "initializer_range", MAX_INITIALIZER_RANGE),  # LaCT declares its own default
    (LACT, "inter_multi", MAX_EXPAND),
    (LACT, "fw_init_gain", MAX_FW_INIT_GAIN),
])
@pytest.mark.parametrize("value", [1e300, 1e306])  # 1e306 was an OverflowError from round(hidden_size * expand)
def test_huge_floats_are_refused_by_name(base, field, limit, value):
    """1e300 passed gt=0 alone: NaN weights (initializer_range), zeroed norms (norm_eps), no width (expand_*)."""
    with pytest.raises(ValidationError, match=rf"{field}\n  Input should be less than or equal to {limit:g} "
                                              rf".*input_value={re.escape(str(value))}"):
        config_from_dict({**base, field: value})


@pytest.mark.parametrize("base", [DELTA_NET, GATED_DELTANET], ids=["delta_net", "gated_deltanet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_fields_at_their_limits_build_models_with_finite_outputs(base, dtype):
    limits = dict(initializer_range=MAX_INITIALIZER_RANGE, norm_eps=MAX_NORM_EPS, expand_v=MAX_EXPAND)
    if base is DELTA_NET:
        limits["expand_k"] = MAX_EXPAND
    torch.manual_seed(0)
    model = build_model({**base, **limits}, dtype=dtype)
    ids = torch.randint(0, 50, (2, 70), generator=torch.Generator().manual_seed(1))  # past one 64-token chunk
    logits = model(ids).logits
    logits.float().logsumexp(-1).sum().backward()
    assert logits.isfinite().all()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_the_limits_keep_every_fla_default():
    fla_models = _fla_or_skip("fla.models")
    for config in (fla_models.DeltaNetConfig(), fla_models.GatedDeltaNetConfig()):
        ours = config_from_dict({k: v for k, v in config.to_dict().items() if k != "transformers_version"})
        assert ours.initializer_range == config.initializer_range and ours.norm_eps == config.norm_eps


def test_a_model_config_class_defines_model_type_without_a_warning():
    """pydantic 2.8 and 2.9 (within pyproject's bound) warned at import, once per model, that the field model_type
    conflicts with the protected namespace "model_"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class NewModelConfig(ModelConfigBase):
            model_type: Literal["new_model"] = "new_model"

    assert [str(warning.message) for warning in caught] == []
    assert NewModelConfig().model_type == "new_model"
