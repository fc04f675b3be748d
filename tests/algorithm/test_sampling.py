import math

import pytest
import torch

from refine.algorithm.sampling import filter_logits, gumbel_noise, logprobs_from_logits, sample_tokens


def logits_of(probs: list[float], rows: int = 1) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()[None].expand(rows, -1).contiguous()


def support(tokens: torch.Tensor) -> set[int]:
    return set(tokens.tolist())


def test_greedy_is_argmax_with_temperature_one_logprobs():
    logits = torch.randn(50, 11, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample_tokens(logits, temperature=0.0, top_p=0.3, top_k=2)
    assert torch.equal(tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logprobs, expected)


def test_top_k_never_emits_tokens_outside_the_k_largest():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, 10, generator=gen)
    tokens, _ = sample_tokens(logits, temperature=1.5, top_k=3, generator=gen)
    top3 = logits.topk(3, dim=-1).indices
    assert (tokens[:, None] == top3).any(-1).all()
    # Every allowed rank is actually used (the filter is not collapsing to greedy).
    ranks = (tokens[:, None] == top3).float().argmax(-1)
    assert support(ranks) == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = [0.5, 0.3, 0.15, 0.05]
    gen = torch.Generator().manual_seed(2)
    # Mass before token 1 is 0.5 < 0.75 (kept); before token 2 it is 0.8 >= 0.75 (removed).
    tokens, _ = sample_tokens(logits_of(probs, 3000), top_p=0.75, generator=gen)
    assert support(tokens) == {0, 1}
    tokens, _ = sample_tokens(logits_of(probs, 3000), top_p=0.81, generator=gen)
    assert support(tokens) == {0, 1, 2}
    tokens, _ = sample_tokens(logits_of(probs, 500), top_p=0.01, generator=gen)
    assert support(tokens) == {0}  # the most likely token always survives


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    # top-k=2 leaves [0.4, 0.3] -> renormalized [4/7, 3/7]; 4/7 >= 0.5, so top-p 0.5 keeps token 0 only.
    # (Applied to the original probabilities, 0.4 < 0.5 would keep token 1 as well.)
    kept = torch.isfinite(filter_logits(logits_of([0.4, 0.3, 0.2, 0.1]), top_k=2, top_p=0.5))
    assert kept[0].tolist() == [True, False, False, False]


def test_top_p_reads_temperature_scaled_probabilities():
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    # T=1: mass before token 1 is 0.4 < 0.45 -> tokens {0, 1}.
    assert torch.isfinite(filter_logits(logits, temperature=1.0, top_p=0.45))[0].tolist() == [True, True, False, False]
    # T=0.5 squares the probabilities: [.16, .09, .04, .01] / .30 -> token 0 has 0.533 >= 0.45 -> {0}.
    assert torch.isfinite(filter_logits(logits, temperature=0.5, top_p=0.45))[0].tolist() == [True, False, False, False]


def test_logprobs_are_temperature_scaled_and_unfiltered():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 20, generator=gen)
    tokens, logprobs = sample_tokens(logits, temperature=0.7, top_p=0.9, top_k=5, generator=gen)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logprobs, expected)
    assert torch.allclose(logprobs_from_logits(logits, tokens, 0.7), logprobs)
    # Unfiltered: the mass of the filtered distribution would be larger (log-prob closer to 0).
    filtered = torch.log_softmax(filter_logits(logits, 0.7, 0.9, 5), -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert (filtered >= logprobs - 1e-6).all() and (filtered > logprobs + 1e-3).any()


def test_logprobs_from_logits_is_differentiable_and_batched():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    out = logprobs_from_logits(logits, tokens, temperature=2.0)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_samples_follow_the_temperature_scaled_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    temperature = 2.0
    target = torch.softmax(probs.log() / temperature, -1)
    draws = 20000
    logits = logits_of(probs.tolist(), draws).float()
    tokens, _ = sample_tokens(logits, temperature, generator=torch.Generator().manual_seed(4))
    freq = torch.bincount(tokens, minlength=4).double() / draws
    # Each frequency within 4.5 binomial standard deviations (two-sided tail ~7e-6 per token).
    sigma = (target * (1 - target) / draws).sqrt().double()
    assert ((freq - target.double()).abs() < 4.5 * sigma).all(), (freq, target)


def test_the_sampling_noise_reaches_past_what_float32_uniforms_allow():
    """Gumbel-max draws a token d nats below the top one only when its noise beats the top token's by d. Noise made
    from float32 uniforms never exceeds -log(-log(1 - 2^-24)) = 16.64, so tokens far down the tail were drawn too
    rarely or never. Of 1e8 exact draws the largest exceeds 16.7 with probability 1 - exp(-1e8 * e^-16.7) > 0.99."""
    generator = torch.Generator().manual_seed(0)
    largest = max(float(gumbel_noise((10**7,), generator, "cpu").max()) for _ in range(10))
    assert 16.7 < largest < math.inf, largest


def test_suppressed_tokens_are_never_emitted():
    logits = torch.zeros(2000, 6)
    logits[:, 2] = 5.0  # the favourite is suppressed (an EOS inside a fixed-length rollout)
    tokens, _ = sample_tokens(logits, suppress_tokens=[2], generator=torch.Generator().manual_seed(5))
    assert 2 not in support(tokens) and len(support(tokens)) == 5
    greedy, _ = sample_tokens(logits, temperature=0.0, suppress_tokens=[2])
    assert 2 not in support(greedy)


def test_same_seed_same_tokens():
    logits = torch.randn(100, 30)
    a, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(11))
    b, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(11))
    c, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments_are_named():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(logits, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_k \(0 = off\) must be a whole number >= 0, got -1"):
        sample_tokens(logits, top_k=-1)
    with pytest.raises(ValueError, match=r"top_k \(0 = off\) must be a whole number, got 2.0"):
        sample_tokens(logits, top_k=2.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="finite"):
        sample_tokens(torch.tensor([[0.0, math.nan]]))
    with pytest.raises(ValueError, match="suppress_tokens contains id 9"):
        sample_tokens(logits, suppress_tokens=[9])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        sample_tokens(torch.randn(2, 3, 5))


def test_top_p_removes_a_token_whose_preceding_mass_reaches_top_p_exactly():
    """Probabilities that are powers of two sum exactly: the boundary is where the kept mass first reaches top_p."""
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).sum().item() == 2


def test_top_k_one_below_the_vocabulary_removes_only_the_smallest():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.1]])
    assert torch.isinf(filter_logits(logits, top_k=3)).tolist() == [[False, True, False, False]]
