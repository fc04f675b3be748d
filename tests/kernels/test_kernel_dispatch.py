"""delta_rule: kernel choice, the REFINE_KERNEL override, and agreement of every path with the oracle."""

from __future__ import annotations

import logging

import pytest
import torch

from refine.kernels import dispatch
from refine.kernels.chunk import chunk_delta_rule
from refine.kernels.dispatch import delta_rule, select_kernel
from refine.kernels.naive import naive_delta_rule

GRAD_NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def _call(kernel, inputs, positions, **kwargs):
    q, k, v, beta, g, h0 = (inputs[n] for n in GRAD_NAMES)
    return kernel(q, k, v, beta, g, initial_state=h0, positions=positions, **kwargs)


@pytest.fixture(autouse=True)
def no_forced_kernel(monkeypatch):
    monkeypatch.delenv(dispatch.KERNEL_ENV, raising=False)


@pytest.mark.parametrize("seq_len,expected", [(0, "torch recurrent"), (1, "torch recurrent"), (2, "torch chunk"),
                                              (100, "torch chunk")])
def test_cpu_selects_torch_kernels(make_inputs, seq_len, expected):
    inputs = make_inputs(seq_len=seq_len)
    assert select_kernel(inputs["q"], None, None, needs_grad=False) == expected


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("seq_len", [5, 100])
def test_dispatch_matches_naive_on_cpu(make_inputs, make_positions, gated, seq_len):
    inputs = make_inputs(seq_len=seq_len, gated=gated)
    positions = make_positions(2, seq_len, 64)
    o, states = _call(delta_rule, inputs, positions)
    o_ref, _, states_ref = _call(naive_delta_rule, inputs, positions)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(states, states_ref, rtol=1e-10, atol=1e-10)


def test_forcing_fla_on_cpu_is_a_clear_error(make_inputs, monkeypatch):
    monkeypatch.setenv(dispatch.KERNEL_ENV, "fla")
    with pytest.raises(ValueError, match="REFINE_KERNEL=fla.*need CUDA"):
        _call(delta_rule, make_inputs(seq_len=20), None)


def test_unknown_kernel_name_is_a_clear_error(make_inputs, monkeypatch):
    monkeypatch.setenv(dispatch.KERNEL_ENV, "triton")
    with pytest.raises(ValueError, match="REFINE_KERNEL must be 'torch' or 'fla'.*'triton'"):
        _call(delta_rule, make_inputs(seq_len=20), None)


def test_forcing_torch_selects_torch(make_inputs, monkeypatch):
    monkeypatch.setenv(dispatch.KERNEL_ENV, "torch")
    assert select_kernel(make_inputs(seq_len=40)["q"], None, None, needs_grad=True) == "torch chunk"


def test_choice_is_logged_once(make_inputs, monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged_choices", set())
    inputs = make_inputs(seq_len=30)
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        for _ in range(3):
            _call(delta_rule, inputs, None)
    messages = [r.getMessage() for r in caplog.records if r.name == dispatch.__name__]
    assert messages == ["delta rule kernel: torch chunk"]


@pytest.mark.parametrize(
    "dtype,gated,seq_len,needs_grad,expected",
    [
        (torch.float32, False, 4096, True, "fla fused_recurrent_delta_rule"),  # fla's chunk rejects float32
        (torch.bfloat16, False, 4096, True, "fla chunk_delta_rule"),
        (torch.bfloat16, False, 8, True, "fla fused_recurrent_delta_rule"),
        (torch.float32, True, 4096, True, "fla chunk_gated_delta_rule"),
        (torch.bfloat16, True, 8, False, "fla fused_recurrent_gated_delta_rule"),
        (torch.bfloat16, True, 8, True, "fla chunk_gated_delta_rule"),  # no backward in the recurrent one
    ],
)
def test_fla_kernel_routing(dtype, gated, seq_len, needs_grad, expected):
    assert dispatch._fla_kernel_name(dtype, gated, seq_len, needs_grad) == expected


def test_gated_gradients_stay_on_torch_where_fla_refuses_its_backward(make_inputs, monkeypatch):
    """Hopper + Triton 3.4.0-3.7.0 without tilelang: fla raises in its gated backward (fla #640)."""
    monkeypatch.setattr(dispatch, "_fla_unusable_reason", lambda *args: None)  # as on CUDA with fla
    monkeypatch.setattr(dispatch, "_fla_gated_backward_refused", lambda: True)
    inputs = make_inputs(seq_len=300, gated=True, dtype=torch.bfloat16)
    q, g = inputs["q"], inputs["g"]
    assert select_kernel(q, g, None, needs_grad=True) == "torch chunk"
    assert select_kernel(q, g, None, needs_grad=False) == "fla chunk_gated_delta_rule"
    assert select_kernel(q, None, None, needs_grad=True) == "fla chunk_delta_rule"  # only the gated rule
    monkeypatch.setenv("REFINE_KERNEL", "fla")
    with pytest.raises(ValueError, match="#640"):
        select_kernel(q, g, None, needs_grad=True)


def test_fla_is_not_used_for_intermediate_positions():
    q = torch.zeros(2, 10, 1, 4)
    assert dispatch._wants_final_state_only(None, 10)
    assert dispatch._wants_final_state_only(torch.tensor([[10], [10]]), 10)
    assert not dispatch._wants_final_state_only(torch.tensor([[10], [9]]), 10)
    assert not dispatch._wants_final_state_only(torch.tensor([[10, 10], [10, 10]]), 10)
    assert "CUDA" in dispatch._fla_unusable_reason(q, 10)
    assert "other than T" in dispatch._request_unservable_reason(torch.tensor([[10], [9]]), 10, state_fn=False)
    assert "chosen after the call" in dispatch._request_unservable_reason(None, 10, state_fn=True)
    assert dispatch._request_unservable_reason(None, 10, state_fn=False) is None


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: compares fla's Triton kernels with the torch path"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("seq_len", [40, 300])
def test_fla_path_matches_torch_path_on_cuda(make_inputs, dtype, gated, seq_len):
    if dispatch._fla_ops() is None:
        pytest.skip("flash-linear-attention with triton is not importable on this CUDA machine")
    # Where fla refuses its gated backward (fla #640) dispatch keeps gradients on our kernel, so only
    # the forward can be compared with fla's.
    backward = not (gated and dispatch._fla_gated_backward_refused())
    positions = torch.full((2, 1), seq_len, device="cuda")
    results = {}
    for path in ("fla", "torch"):
        inputs = make_inputs(
            batch=2, seq_len=seq_len, heads=4, key_dim=64, value_dim=64,
            gated=gated, dtype=dtype, device="cuda", requires_grad=backward,
        )
        if path == "fla":
            kernel = select_kernel(inputs["q"], inputs["g"], positions, needs_grad=backward)
            assert kernel.startswith("fla"), kernel
            o, final = _call(delta_rule, inputs, positions)
        else:
            o, final = _call(chunk_delta_rule, inputs, positions)
        if not backward:
            results[path] = (o, final, {})
            continue
        gen = torch.Generator().manual_seed(5)
        w_o = torch.randn(o.shape, generator=gen).to("cuda")
        w_s = torch.randn(final.shape, generator=gen).to("cuda")
        ((o.float() * w_o).sum() + (final.float() * w_s).sum()).backward()
        grads = {n: inputs[n].grad for n in GRAD_NAMES if inputs[n] is not None}
        results[path] = (o, final, grads)
    (o, final, grads), (o_ref, final_ref, grads_ref) = results["fla"], results["torch"]
    # fla may use TF32 dots for float32 and rounds intermediates to the input dtype; a wrong convention
    # (scale, decay order, state layout) would show as an error of order 1.
    tol = 1e-2 if dtype == torch.float32 else 4e-2
    assert o.dtype == dtype and final.dtype == torch.float32
    assert _relative_error(o, o_ref) < tol
    assert _relative_error(final, final_ref) < tol
    for n, grad in grads_ref.items():
        assert _relative_error(grads[n], grad) < 2 * tol, n


def _fla_stand_in(calls: list[str]):
    """A stand-in for fla's kernels on CPU: records the kernel dispatch chose and answers with ours."""
    def run(kernel, q, k, v, beta, g, scale, initial_state, want_final_state):
        calls.append(kernel)
        o, states_at = chunk_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state, state_fn=True)
        return o, states_at(None) if want_final_state else None
    return run


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("seq_len", [1, 100])
def test_final_state_only_calls_go_to_fla_and_positions_calls_to_torch(make_inputs, monkeypatch, gated, seq_len):
    """fla returns a final state from an initial one: prefill and decoding need nothing else."""
    monkeypatch.setattr(dispatch, "_fla_unusable_reason", lambda *args: None)  # as on CUDA with fla
    calls: list[str] = []
    monkeypatch.setattr(dispatch, "_fla_delta_rule", _fla_stand_in(calls))
    inputs = make_inputs(seq_len=seq_len, gated=gated, dtype=torch.bfloat16)
    o, final = _call(delta_rule, inputs, None, output_final_state=True)
    assert len(calls) == 1 and calls[0].startswith("fla"), calls
    assert final.shape == inputs["initial_state"].shape and final.dtype == torch.float32
    _call(delta_rule, inputs, None, state_fn=True)  # positions chosen after the call: only ours keep them
    _call(delta_rule, inputs, torch.tensor([[0], [seq_len]]))  # a position before T
    assert len(calls) == 1, calls


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero", "h0"])
@pytest.mark.parametrize("seq_len", [0, 1, 5, 100])
def test_output_final_state_matches_naive_on_cpu(make_inputs, gated, with_initial_state, seq_len):
    inputs = make_inputs(seq_len=seq_len, gated=gated, with_initial_state=with_initial_state)
    o, final = _call(delta_rule, inputs, None, output_final_state=True)
    o_ref, final_ref, _ = _call(naive_delta_rule, inputs, None)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_output_final_state_with_positions_is_a_clear_error(make_inputs):
    inputs = make_inputs(seq_len=5)
    with pytest.raises(ValueError, match="output_final_state=True.*neither positions"):
        _call(delta_rule, inputs, torch.tensor([[5], [5]]), output_final_state=True)
    with pytest.raises(ValueError, match="output_final_state=True.*nor state_fn"):
        _call(delta_rule, inputs, None, output_final_state=True, state_fn=True)


def test_generate_and_carried_forwards_use_fla_where_only_the_final_state_is_wanted(monkeypatch):
    """generate()'s prefill (lengths all T) and decoding steps, and a prefix re-prefilled for its state,
    go to fla; forwards that want states at positions (or rows shorter than T) stay on ours."""
    from refine.generate import generate
    from refine.models import build_model

    monkeypatch.setattr(dispatch, "_fla_unusable_reason", lambda *args: None)  # as on CUDA with fla
    calls: list[str] = []
    monkeypatch.setattr(dispatch, "_fla_delta_rule", _fla_stand_in(calls))
    chosen: list[tuple[int, str]] = []
    select = dispatch.select_kernel

    def spy(q, *args, **kwargs):
        chosen.append((q.shape[1], select(q, *args, **kwargs)))
        return chosen[-1][1]

    monkeypatch.setattr(dispatch, "select_kernel", spy)
    for config in (dict(model_type="delta_net", hidden_size=32, num_heads=2),
                   dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16)):
        torch.manual_seed(0)
        model = build_model(dict(config, num_hidden_layers=2, vocab_size=50, intermediate_size=48),
                            dtype=torch.bfloat16)
        ids = torch.randint(0, 50, (2, 100))
        chosen.clear()
        generate(model, ids, 3)
        assert {length for length, _ in chosen} == {100, 1}
        assert all(kernel.startswith("fla") for _, kernel in chosen), chosen
        chosen.clear()
        model(ids[:, :40], lengths=torch.full((2,), 40))  # a rollout's prefix, re-prefilled for its state
        assert chosen and all(kernel.startswith("fla") for _, kernel in chosen), chosen
        for kwargs in (dict(state_positions=torch.tensor([[3], [100]])), dict(lengths=torch.tensor([100, 60])),
                       dict(defer_states=True)):
            chosen.clear()
            model(ids, **kwargs)
            assert chosen and all(kernel.startswith("torch") for _, kernel in chosen), (kwargs, chosen)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: compares fla's Triton kernels with the torch path"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero", "h0"])
@pytest.mark.parametrize("seq_len", [1, 40, 300])  # a decoding step, fused_recurrent, chunk
def test_fla_final_state_matches_torch_path_on_cuda(make_inputs, dtype, gated, with_initial_state, seq_len):
    """output_final_state=True (prefill, decoding) on fla: the output and final state of our kernels."""
    if dispatch._fla_ops() is None:
        pytest.skip("flash-linear-attention with triton is not importable on this CUDA machine")
    inputs = make_inputs(batch=2, seq_len=seq_len, heads=4, key_dim=64, value_dim=64, gated=gated,
                         with_initial_state=with_initial_state, dtype=dtype, device="cuda")
    with torch.no_grad():
        assert select_kernel(inputs["q"], inputs["g"], None, needs_grad=False).startswith("fla")
        o, final = _call(delta_rule, inputs, None, output_final_state=True)
        o_ref, states_at = _call(chunk_delta_rule, inputs, None, state_fn=True)
        final_ref = states_at(None)
    assert o.dtype == dtype and final.dtype == torch.float32 and final.shape == final_ref.shape
    tol = 1e-2 if dtype == torch.float32 else 4e-2
    assert _relative_error(o, o_ref) < tol
    assert _relative_error(final, final_ref) < tol
