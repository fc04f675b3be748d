"""The model contract: segments with a carried state equal one pass; padding never leaks."""

import pytest
import torch

from refine.models import ModelState


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_segments_equal_whole_sequence(tiny_model):
    model = tiny_model
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 150), generator=gen)
    weights = torch.randn(2, 150, model.config.vocab_size, generator=gen, dtype=torch.float64)

    model.zero_grad()
    whole = model(ids)
    (whole.logits * weights).sum().backward()
    whole_grads = _grads(model)

    cuts = sorted(torch.randperm(148, generator=gen)[:4].add(1).tolist()) + [64, 128]
    bounds = [0] + sorted(set(cuts)) + [150]
    model.zero_grad()
    state, logits, hidden = None, [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = model(ids[:, a:b], state=state)
        state = out.state
        logits.append(out.logits)
        hidden.append(out.hidden_states)
    logits = torch.cat(logits, 1)
    (logits * weights).sum().backward()
    torch.testing.assert_close(logits, whole.logits, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.cat(hidden, 1), whole.hidden_states, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state.layers[-1]["recurrent"], whole.state.layers[-1]["recurrent"])
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-8, atol=1e-10, msg=name)


def test_padded_batch_matches_rows_alone(tiny_model):
    model = tiny_model
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([70, 33, 1])
    ids = torch.randint(0, model.config.vocab_size, (3, 70), generator=gen)
    ids[1, 33:] = 0
    ids[2, 1:] = 7
    batch = model(ids, lengths=lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = model(ids[row:row + 1, :length])
        torch.testing.assert_close(batch.logits[row, :length], alone.logits[0])
        for name, tensor in alone.state.layers[0].items():
            torch.testing.assert_close(batch.state.layers[0][name][row], tensor[0], msg=name)
        # Continuing from the padded batch's state equals continuing the row alone.
        nxt = torch.randint(0, model.config.vocab_size, (1, 5), generator=gen)
        cont_batch = model(nxt, state=batch.state.index([row]))
        cont_alone = model(nxt, state=alone.state)
        torch.testing.assert_close(cont_batch.logits, cont_alone.logits)


def test_position_states_equal_prefix_states_and_continue_exactly(tiny_model):
    model = tiny_model
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 130), generator=gen)
    positions = torch.tensor([[0, 1, 64, 65, 130], [3, 63, 64, 100, 128]])
    out = model(ids, state_positions=positions)
    assert out.position_states.batch_size == 10
    for b in range(2):
        for j, p in enumerate(positions[b].tolist()):
            state = out.position_states.index([b * 5 + j])
            if p > 0:
                prefix = model(ids[b:b + 1, :p]).state
                for name, tensor in prefix.layers[1].items():
                    torch.testing.assert_close(state.layers[1][name], tensor, msg=f"{name}@{p}")
            if p < 130:
                rest = model(ids[b:b + 1, p:], state=state if p > 0 else None)
                torch.testing.assert_close(rest.logits[0], out.logits[b, p:])


def test_step_decoding_equals_full_forward(tiny_model):
    model = tiny_model
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    full = model(ids)
    state = model(ids[:, :5]).state
    for t in range(5, 12):
        out = model(ids[:, t:t + 1], state=state)
        torch.testing.assert_close(out.logits[:, 0], full.logits[:, t])
        state = out.state


def test_state_expand_index_detach(tiny_model):
    model = tiny_model
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    state = model(ids).state
    expanded = state.expand(3)
    assert expanded.batch_size == 6
    for name, tensor in expanded.layers[0].items():
        torch.testing.assert_close(tensor[4], state.layers[0][name][1])
    picked = expanded.index([5, 0])
    torch.testing.assert_close(picked.layers[1]["recurrent"][0], state.layers[1]["recurrent"][1])
    assert not any(t.requires_grad for layer in state.detach().layers for t in layer.values())
    merged = ModelState.cat([state.index([0]), state.index([1])])
    torch.testing.assert_close(merged.layers[0]["recurrent"], state.layers[0]["recurrent"])


def test_forward_under_bfloat16_autocast_keeps_float32_states(tiny_model):
    # Rollouts may run under autocast, as the paper's code generates. The delta-rule kernels turn it
    # off inside, so their products never mix dtypes and the carried states stay float32.
    model = tiny_model.float()
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[5, 70], [33, 64]])
    with torch.no_grad():
        exact = model(ids, state_positions=positions)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids, state_positions=positions)
    assert mixed.logits.dtype == torch.bfloat16
    for got, want in ((mixed.state, exact.state), (mixed.position_states, exact.position_states)):
        recurrent = [layer["recurrent"] for layer in got.layers]
        assert all(state.dtype == torch.float32 for state in recurrent)
        for state, reference in zip(recurrent, (layer["recurrent"] for layer in want.layers)):
            _assert_bf16_close(state, reference)
    _assert_bf16_close(mixed.logits.float(), exact.logits)


# bfloat16 keeps 8 significant bits: each rounding is off by at most 2^-8 = 0.0039 of the value. The
# projections feeding the kernels round their inputs and outputs a few times per layer, so a row (one
# sequence's state or logits) comes out a few roundings off; the tiny models give 0.005-0.011. 0.03
# (~8 roundings) leaves room for that and still refuses a wrong, halved or zeroed state (error 1).
BF16_RELATIVE_ERROR = 0.03
# Every reference row has a norm of 0.15 or more (the states' entries are below 0.2, the logits'
# below 1): a row near zero would make a relative error meaningless, and its check empty.
MIN_REFERENCE_NORM = 0.1


def _assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Each row of `got` (a batch entry) is within BF16_RELATIVE_ERROR of `want`'s, in relative norm."""
    want_norms = want.double().flatten(1).norm(dim=1)
    assert (want_norms > MIN_REFERENCE_NORM).all(), f"reference rows near zero: norms {want_norms.tolist()}"
    errors = (got.double() - want.double()).flatten(1).norm(dim=1) / want_norms
    assert (errors < BF16_RELATIVE_ERROR).all(), f"relative errors {errors.tolist()} of rows {tuple(got.shape)}"


def test_logits_at_positions_are_those_rows_of_the_full_logits(tiny_model):
    model = tiny_model
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[69, 0, 33], [5, 64, 5]])
    full = model(ids, output_state=False).logits
    some = model(ids, output_state=False, logit_positions=positions).logits
    assert some.shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(some, full[torch.arange(2)[:, None], positions], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"logit_positions must lie in \[0, 69\]"):
        model(ids, logit_positions=torch.tensor([[70], [0]]))
    with pytest.raises(ValueError, match=r"logit_positions must be \[batch=2, P\]"):
        model(ids, logit_positions=torch.tensor([3, 4]))


@pytest.mark.parametrize("length", [3, 150])  # the token-loop kernel, then the chunk kernel
def test_final_state_of_whole_rows_equals_the_state_at_their_length(tiny_model, length):
    """Without `lengths` the model asks its mixers for every row's end directly (no positions to
    gather); that state is the one a gather at the full length gives."""
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(5))
    whole = tiny_model(ids).state
    gathered = tiny_model(ids, lengths=torch.full((2,), length)).state
    for layer_whole, layer_gathered in zip(whole.layers, gathered.layers):
        assert layer_whole.keys() == layer_gathered.keys()
        for name in layer_whole:
            torch.testing.assert_close(layer_whole[name], layer_gathered[name], rtol=0, atol=0, msg=name)


def test_a_decoding_step_never_waits_for_the_device(tiny_model, host_reads):
    """One token from a carried state reads no tensor value on the host (no .item(), no bool(tensor)):
    on a GPU each such read would stall the queue once per layer and token."""
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(6))
    state = tiny_model(ids).state
    reads, out = host_reads(lambda: tiny_model(ids[:, -1:], state=state))
    assert reads == 0, f"a decoding step read {reads} values on the host"
    assert out.state.batch_size == 3


def test_a_prefill_of_whole_rows_never_waits_for_the_device(tiny_model, host_reads):
    """The final state of rows without `lengths` comes from the chunk kernel without checking positions
    the kernel built itself (each check reads the device twice per layer)."""
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(7))
    reads, out = host_reads(lambda: tiny_model(ids))
    assert reads == 0, f"a prefill read {reads} values on the host"
    assert out.state.batch_size == 2


def test_a_batch_of_no_rows_gives_no_logits_and_no_gradient(tiny_model):
    # As LaCT's (tests/models/test_lact.py): a data-parallel rank past the batch's documents runs zero rows.
    out = tiny_model(torch.zeros(0, 12, dtype=torch.long))
    assert out.logits.shape == (0, 12, tiny_model.config.vocab_size)
    out.logits.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in tiny_model.parameters())
