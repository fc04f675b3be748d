"""Building blocks against their torch definitions: the short convolution's hand-written backward, the gated norm."""

import pytest
import torch
import torch.nn.functional as F

from refine.models import common
from refine.models.common import CausalDepthwiseConv, GatedRMSNorm, ShortConvolution, short_convolutions


# (elements, minimum rows) per block: the product's sizes (one block here); blocks of 3 time steps
# (2 rows x 5 channels x 3 = 30 elements), so 37 steps end in a partial block.
@pytest.mark.parametrize("block_elements, min_rows", [(1 << 18, 16), (30, 1)])
@pytest.mark.parametrize("length", [1, 4, 37])
def test_causal_depthwise_conv_matches_conv1d_with_gradients(length, block_elements, min_rows, monkeypatch):
    monkeypatch.setattr(common, "CPU_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(common, "MIN_BLOCK_ROWS", min_rows)
    assert common.rows_per_block(torch.empty(2, length, 5)) == max(min_rows, block_elements // 10)
    gen = torch.Generator().manual_seed(length)
    cache = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, length, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y, padded = CausalDepthwiseConv.apply(cache, x, weight)
    reference_padded = torch.cat([cache, x], 1)
    reference = F.conv1d(reference_padded.transpose(1, 2), weight[:, None], groups=5).transpose(1, 2)
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded, reference_padded, rtol=0, atol=0)
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y * upstream).sum(), (cache, x, weight))
    expected = torch.autograd.grad((reference * upstream).sum(), (cache, x, weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(CausalDepthwiseConv.apply, (cache, x, weight))


@pytest.mark.parametrize("use_output", [True, False])
def test_picked_caches_pass_their_gradient_through_the_convolution(use_output):
    # The caches after two positions (one picked twice) join the convolution's own gradient, on CPU
    # as a sparse gradient added in place; also when the convolution's output is not used at all.
    torch.manual_seed(3)
    conv = ShortConvolution(6, 4).double()
    x = torch.randn(2, 12, 6, dtype=torch.float64, requires_grad=True)
    cache = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[5, 5], [0, 12]])
    weights = torch.randn(4, 3, 6, dtype=torch.float64)
    upstream = torch.randn(2, 12, 6, dtype=torch.float64)

    def loss(y: torch.Tensor, caches: torch.Tensor) -> torch.Tensor:
        return (caches * weights).sum() + ((y * upstream).sum() if use_output else 0)

    y, padded = conv(x, cache)
    got = torch.autograd.grad(loss(y, conv.cache_at(padded, positions)), (x, cache, conv.weight), allow_unused=True)
    reference_padded = torch.cat([cache, x], 1)
    reference_y = F.silu(F.conv1d(reference_padded.transpose(1, 2), conv.weight, groups=6)).transpose(1, 2)
    windows = torch.stack([reference_padded[b, p:p + 3] for b, row in enumerate(positions.tolist()) for p in row])
    want = torch.autograd.grad(loss(reference_y, windows), (x, cache, conv.weight), allow_unused=True)
    for g, w in zip(got, want):
        if w is None:  # the weight, when only the caches are used
            assert g is None or not g.any()
            continue
        assert g.layout == torch.strided
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_short_convolutions_without_gradients_equal_the_autograd_path():
    # No grad: the shifted sum runs without its autograd node (rollout passes and decoding).
    torch.manual_seed(2)
    convs = [ShortConvolution(3, 4), ShortConvolution(5, 4, activation=None)]
    x = torch.randn(2, 11, 8)
    cache = torch.randn(2, 3, 8)
    with_grad, _ = short_convolutions(convs, x, cache)
    assert with_grad.requires_grad
    with torch.no_grad():
        without, _ = short_convolutions(convs, x, cache)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def test_short_convolution_continues_from_its_cache():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4).double()
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    whole, padded = conv(x, None)
    first, first_padded = conv(x[:, :7], None)
    cache = conv.cache_at(first_padded, torch.full((2, 1), 7))
    second, _ = conv(x[:, 7:], cache)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)


def test_grouped_short_convolutions_equal_separate_ones():
    torch.manual_seed(1)
    convs = [ShortConvolution(3, 4, activation=None), ShortConvolution(5, 4, bias=True, activation="silu")]
    for conv in convs:
        conv.double()
        if conv.bias is not None:
            torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    cache = torch.randn(2, 3, 8, dtype=torch.float64)
    y, padded = short_convolutions(convs, x, cache)
    pieces = [conv(part, part_cache)[0] for conv, part, part_cache in
              zip(convs, x.split([3, 5], -1), cache.split([3, 5], -1))]
    torch.testing.assert_close(y, torch.cat(pieces, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded, torch.cat([cache, x], 1))
    with pytest.raises(ValueError, match="kernel size"):
        short_convolutions([ShortConvolution(3, 4), ShortConvolution(3, 2)], x[..., :6], None)


@pytest.mark.parametrize("activation", ["swish", "silu", "sigmoid"])
def test_gated_rms_norm_normalizes_then_gates(activation):
    # x has RMS 2.5 (eps 0), so the normalized row is [0.4, 0.8, 0.8, 1.6]; sigmoid(+-ln 3) = 0.75, 0.25.
    norm = GatedRMSNorm(4, eps=0.0, activation=activation).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    x = torch.tensor([1.0, 2.0, 2.0, 4.0], dtype=torch.float64)
    log3 = torch.tensor(3.0, dtype=torch.float64).log().item()
    gate = torch.tensor([0.0, log3, -log3, 0.0], dtype=torch.float64)
    gated = {"sigmoid": [0.5, 0.75, 0.25, 0.5], "swish": [0.0, 0.75 * log3, -0.25 * log3, 0.0]}
    gated["silu"] = gated["swish"]
    expected = torch.tensor([0.4, 1.6, 0.4, 1.6], dtype=torch.float64) * torch.tensor(gated[activation], dtype=torch.float64)
    torch.testing.assert_close(norm(x, gate), expected, rtol=1e-12, atol=1e-12)


def test_gated_rms_norm_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="activation='gelu' is not supported"):
        GatedRMSNorm(4, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_l2_normalize_computes_in_at_least_float32_as_fla_kernels_do(dtype):
    """fla normalizes half-precision q and k in float32 inside its kernels and rounds the result once;
    normalizing in the half dtype itself rounds the sum of squares and the scale too."""
    from refine.models.delta_mixers import l2_normalize

    x = torch.randn(64, 2, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    wide = x.to(torch.promote_types(dtype, torch.float32))
    expected = (wide * torch.rsqrt(wide.pow(2).sum(-1, keepdim=True) + 1e-6)).to(dtype)  # fla: x * rstd
    out = l2_normalize(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    if dtype == torch.bfloat16:  # normalizing in bfloat16 itself is what this guards against
        narrow = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
        assert not torch.equal(narrow, expected)
