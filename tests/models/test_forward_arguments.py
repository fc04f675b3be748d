"""forward's lengths and positions are checked up front, naming the argument and the bad value, for
every model (LaCT once took lengths=[-1, 2] as tokens_seen=-1, and a float 1.5 was cast to 1)."""

import pytest
import torch

from refine.models import build_model

CONFIGS = {
    "delta_net": dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=50,
                      intermediate_size=48),
    "gated_deltanet": dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16,
                           num_hidden_layers=1, vocab_size=50, intermediate_size=48),
    "lact": dict(model_type="lact_swiglu", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attn_heads=2,
                 num_lact_heads=2, lact_chunk_size=4, window_size=3, intermediate_size=24),
}


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    torch.manual_seed(0)
    return build_model(CONFIGS[request.param], dtype=torch.float64)


IDS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("lengths,match", [
    (torch.tensor([-1, 2]), r"lengths must lie in \[0, 6\].*\[-1, 2\]"),
    (torch.tensor([7, 2]), r"lengths must lie in \[0, 6\].*\[7, 2\]"),
    (torch.tensor([2]), r"lengths must have shape \[batch=2\], got \(1,\)"),  # once broadcast to both rows
    (torch.tensor([[2, 2]]), r"lengths must have shape \[batch=2\], got \(1, 2\)"),
    (torch.tensor([2.7, 3.2]), r"lengths must be an integer tensor, got dtype torch.float32"),
    (torch.tensor([True, True]), r"lengths must be an integer tensor, got dtype torch.bool"),
    ([2, 3], r"lengths must be an integer tensor, got list"),
])
def test_bad_lengths_are_refused_by_name(model, lengths, match):
    with pytest.raises(ValueError, match=match):
        model(IDS, lengths=lengths)


def test_lengths_shape_and_dtype_are_checked_without_states(model):
    """Without states the values are not read (no host sync), but the shape and dtype still are."""
    with pytest.raises(ValueError, match=r"lengths must have shape \[batch=2\]"):
        model(IDS, lengths=torch.tensor([2]), output_state=False)
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor"):
        model(IDS, lengths=torch.tensor([2.0, 3.0]), output_state=False)


def test_int32_lengths_give_the_int64_result(model):
    with torch.no_grad():
        wide = model(IDS, lengths=torch.tensor([3, 6])).state
        narrow = model(IDS, lengths=torch.tensor([3, 6], dtype=torch.int32)).state
    for a, b in zip(wide.layers, narrow.layers):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_full_lengths_give_the_state_of_no_lengths(model):
    """lengths all T takes the final-state-only path (fla's kernels on CUDA): the same state as without."""
    with torch.no_grad():
        given = model(IDS, lengths=torch.tensor([6, 6])).state
        none = model(IDS).state
    for a, b in zip(given.layers, none.layers):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kwargs", [
    ("state_positions", dict(state_positions=torch.tensor([[1.5], [2.0]]))),
    ("logit_positions", dict(logit_positions=torch.tensor([[1.5], [2.0]]))),
])
def test_float_positions_are_refused_by_name(model, name, kwargs):
    with pytest.raises(ValueError, match=rf"{name} must be an integer tensor, got dtype torch.float32"):
        model(IDS, **kwargs)


def test_float_deferred_positions_are_refused(model):
    out = model(IDS, output_state=False, defer_states=True)
    with pytest.raises(ValueError, match=r"positions must be an integer tensor, got dtype torch.float32"):
        out.states_at(torch.tensor([[1.5], [2.0]]))


def test_state_positions_out_of_range_name_the_argument(model):
    with pytest.raises(ValueError, match=r"state_positions must lie in \[0, length\].*\[\[7\], \[0\]\]"):
        model(IDS, state_positions=torch.tensor([[7], [0]]))


@pytest.mark.parametrize("count", [2.5, True, -1, "3"])
def test_generate_refuses_a_token_count_that_is_not_a_count(count):
    from refine.generate import generate

    torch.manual_seed(0)
    model = build_model(CONFIGS["delta_net"])
    with pytest.raises(ValueError, match=rf"max_new_tokens must be a whole number( >= 0)?, got {count!r}"):
        generate(model, IDS, count)


def test_a_state_of_another_models_config_is_refused_naming_what_differs(model):
    config = next(config for config in CONFIGS.values() if config["model_type"] == model.config.model_type)
    deeper = build_model({**config, "num_hidden_layers": 2}, dtype=torch.float64)
    with torch.no_grad():
        two_layers = deeper(IDS).state
        with pytest.raises(ValueError, match="state has 2 layers but the model has 1"):
            model(IDS, state=two_layers)
        own = model(IDS).state
        other_keys = own.map(lambda t: t)
        other_keys.layers[0]["extra"] = own.layers[0][sorted(own.layers[0])[0]]
        with pytest.raises(ValueError, match=r"state layer 0 holds \[.*'extra'.*\] but the model's layer 0 keeps"):
            model(IDS, state=other_keys)
        model(IDS, state=own)  # its own state carries over


def test_a_short_convolution_state_does_not_fit_a_model_without_one():
    with_conv = build_model({**CONFIGS["delta_net"], "use_short_conv": True})
    without = build_model({**CONFIGS["delta_net"], "use_short_conv": False})
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"holds \['conv_k', 'conv_q', 'conv_v', 'recurrent'\] but the model's "
                                             r"layer 0 keeps \['recurrent'\]"):
            without(IDS, state=with_conv(IDS).state)
        with pytest.raises(ValueError, match=r"holds \['recurrent'\] but the model's layer 0 keeps \['conv_k'"):
            with_conv(IDS, state=without(IDS).state)
