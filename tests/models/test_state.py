"""ModelState.to: floating tensors take every argument; integer counters keep their dtype and follow only
a device that the arguments name."""

import pytest
import torch

from refine.models import ModelState
from refine.models.lact import LaCTConfig, LaCTForCausalLM


def _lact_state() -> ModelState:
    torch.manual_seed(0)
    config = LaCTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attn_heads=2, num_lact_heads=2,
                        lact_chunk_size=4, window_size=3, intermediate_size=24)
    model = LaCTForCausalLM(config)
    with torch.no_grad():
        return model(torch.randint(0, 40, (2, 6))).state


def _devices_and_dtypes(state: ModelState) -> set[tuple[str, torch.device, torch.dtype]]:
    return {(name, t.device, t.dtype) for layer in state.layers for name, t in layer.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_dtype_alone_keeps_every_tensor_on_the_states_device(dtype):
    # meta stands for any device but the CPU: a dtype-only cast once sent the counters to the CPU
    # (which, from meta, raises).
    state = _lact_state().to("meta")
    assert {device.type for _, device, _ in _devices_and_dtypes(state)} == {"meta"}
    cast = state.to(dtype)
    for layer in cast.layers:
        for name, tensor in layer.items():
            assert tensor.device.type == "meta", name
            assert tensor.dtype == (torch.long if name == "tokens_seen" else dtype), name


def test_counters_follow_a_named_device_and_keep_their_dtype():
    state = _lact_state()
    for moved in (state.to("meta"), state.to(device="meta", dtype=torch.float64),
                  state.to(torch.empty(0, device="meta", dtype=torch.float64)), state.to("meta", torch.float16)):
        for layer in moved.layers:
            assert layer["tokens_seen"].device.type == "meta" and layer["tokens_seen"].dtype == torch.long
            assert all(t.device.type == "meta" for t in layer.values())
    # back to the CPU with a dtype only: the values survive, the counters stay integers
    cast = state.to(torch.float64)
    for layer, original in zip(cast.layers, state.layers):
        assert torch.equal(layer["tokens_seen"], original["tokens_seen"])
        assert layer["tokens_seen"].dtype == torch.long and layer["fw_w0"].dtype == torch.float64
        torch.testing.assert_close(layer["fw_w0"], original["fw_w0"].double(), rtol=0, atol=0)


@pytest.mark.parametrize("config", [
    dict(model_type="lact_swiglu", vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attn_heads=2,
         num_lact_heads=2, lact_chunk_size=4, window_size=3, intermediate_size=24),  # int64 tokens_seen
    dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=50),
])
def test_inspect_counts_each_state_tensors_own_bytes(config):
    """A bfloat16 model keeps float32 recurrent states and int64 counters: bytes are not elements x 2."""
    from refine.models import build_model, inspect_model

    model = build_model(config, dtype=torch.bfloat16)
    state = model(torch.zeros(1, 1, dtype=torch.long)).state
    expected = sum(t.numel() * t.element_size() for layer in state.layers for t in layer.values())
    info = inspect_model(model)
    assert info["recurrent_state_bytes_per_sequence"] == expected
    assert expected > info["recurrent_state_elements_per_sequence"] * torch.bfloat16.itemsize


def test_index_takes_integer_rows_and_refuses_masks_and_fractions():
    state = _lact_state()
    picked = state.index(torch.tensor([1, 1, 0]))
    assert picked.batch_size == 3
    assert torch.equal(picked.layers[0]["attn_k"][2], state.layers[0]["attn_k"][0])
    assert state.index([]).batch_size == 0
    with pytest.raises(ValueError, match=r"idx must hold integer row numbers, got dtype torch.bool: \[True, False\]"):
        state.index(torch.tensor([True, False]))  # as rows it would read [1, 0]
    with pytest.raises(ValueError, match="got dtype torch.float32"):
        state.index(torch.tensor([0.9, 1.7]))
