"""pick: rows of a tensor whose gradient (sparse on CPU) joins the tensor's other, dense gradient."""

import torch

from refine.kernels.picks import densify, pick


def test_pick_gradient_adds_into_the_dense_gradient_of_other_uses():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([[0], [3], [3]])  # [3, 1]: row 3 twice
    cols = torch.tensor([[1, 5], [2, 2], [2, 0]])  # [3, 2]; broadcast with rows, (3, 2) picked twice
    weights = torch.randn(3, 2, 3, generator=gen, dtype=torch.float64)

    def loss(take):
        x = base * 2
        return (take(x) * weights).sum() + (x ** 3).sum()

    got, = torch.autograd.grad(loss(lambda x: pick(x, (rows, cols))), base)
    want, = torch.autograd.grad(loss(lambda x: x[rows, cols]), base)
    assert got.layout == torch.strided
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pick_forward_equals_indexing_without_gradients():
    x = torch.arange(24.0).view(4, 6)
    index = (torch.tensor([2, 0, 2]),)
    assert torch.equal(pick(x, index), x[index])
    with torch.no_grad():
        assert torch.equal(pick(x.requires_grad_(), index), x[index])


def test_a_pick_alone_gives_a_sparse_gradient_that_densify_sums():
    # The contract's other half: a backward that may receive a pick's gradient alone densifies it.
    x = torch.zeros(5, 2, dtype=torch.float64, requires_grad=True)
    (pick(x, (torch.tensor([1, 4, 1]),)) * torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])).sum().backward()
    assert x.grad.is_sparse
    expected = torch.tensor([[0, 0], [6, 8], [0, 0], [0, 0], [3, 4]], dtype=torch.float64)
    torch.testing.assert_close(densify(x.grad), expected)
    assert densify(None) is None and densify(expected) is expected
