import math

import pytest
import torch

from refine.algorithm.selection import (
    min_document_length,
    select_positions,
    smooth_entropy,
    smoothing_kernel_size,
    token_entropy,
)
from refine.errors import NonFiniteOutputError


def chi2_sf(x: float, df: int) -> float:
    """Survival function of the chi-square distribution, exact closed forms for integer df.

    Even df = 2m: exp(-x/2) * sum_{i<m} (x/2)^i / i!.
    Odd df = 2m+1: erfc(sqrt(x/2)) + exp(-x/2) * sum_{i=1..m} (x/2)^(i-1/2) / Gamma(i+1/2).
    """
    half = x / 2
    if df % 2 == 0:
        return sum(math.exp(-half + i * math.log(half) - math.lgamma(i + 1)) for i in range(df // 2))
    tail = sum(math.exp(-half + (i - 0.5) * math.log(half) - math.lgamma(i + 0.5)) for i in range(1, df // 2 + 1))
    return math.erfc(math.sqrt(half)) + tail


def test_chi2_sf_matches_published_critical_values():
    # Standard table entries (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.4).
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=2e-4)
    assert chi2_sf(5.991, 2) == pytest.approx(0.05, abs=2e-4)
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, abs=2e-4)
    assert chi2_sf(58.301, 29) == pytest.approx(0.001, abs=2e-5)
    assert chi2_sf(59.703, 30) == pytest.approx(0.001, abs=2e-5)


def profile(length: int) -> torch.Tensor:
    """A fixed entropy profile: a slow wave plus spikes every 4 tokens (which smoothing spreads)."""
    t = torch.arange(length, dtype=torch.float64)
    return 2.0 + 0.8 * torch.sin(t / 4) + 1.0 * (t % 4 == 0).double()


def expected_position_pmf(
    scores: torch.Tensor, length: int, num_chunks: int, k: int, margin: int
) -> list[dict[int, float]]:
    """Per chunk: probability of each clamped position, written out from the definition."""
    size = length // num_chunks
    low, high = max(margin, 1), length - max(margin, k)
    out = []
    for j in range(num_chunks):
        probs = torch.softmax(scores[j * size : (j + 1) * size], dim=0)
        pmf: dict[int, float] = {}
        for offset, p in enumerate(probs.tolist()):
            position = min(max(j * size + offset + 1, low), high)
            pmf[position] = pmf.get(position, 0.0) + p
        out.append(pmf)
    return out


def chi_square(positions: torch.Tensor, pmfs: list[dict[int, float]]) -> tuple[float, int, float]:
    """Pooled Pearson statistic over chunks; returns (statistic, df, smallest expected count)."""
    stat, df, smallest = 0.0, 0, float("inf")
    draws = positions.shape[0]
    for j, pmf in enumerate(pmfs):
        column = positions[:, j].tolist()
        assert set(column) <= set(pmf), "a drawn position has zero probability"
        for position, p in pmf.items():
            expected = draws * p
            smallest = min(smallest, expected)
            stat += (column.count(position) - expected) ** 2 / expected
        df += len(pmf) - 1
    return stat, df, smallest


L, C, K, MARGIN, DRAWS = 160, 4, 5, 20, 3000


def test_kernel_is_made_odd():
    assert [smoothing_kernel_size(k) for k in (1, 2, 4, 5, 8)] == [1, 3, 5, 5, 9]


def test_smoothing_counts_zero_padding_and_spreads_a_spike():
    ones = torch.ones(1, 10)
    smoothed = smooth_entropy(ones, rollout_len=5)
    # Kernel 5, padding 2, padded zeros counted: t=0 averages (0+0+1+1+1)/5, t=1 (0+1+1+1+1)/5.
    assert smoothed[0, :3].tolist() == pytest.approx([0.6, 0.8, 1.0])
    assert smoothed[0, -2:].tolist() == pytest.approx([0.8, 0.6])

    spike = torch.zeros(1, 30)
    spike[0, 10] = 5.0
    smoothed = smooth_entropy(spike, rollout_len=4)  # even k -> kernel 5
    assert smoothed[0].nonzero().flatten().tolist() == [8, 9, 10, 11, 12]
    assert smoothed[0, 8:13].tolist() == pytest.approx([1.0] * 5)


def test_smoothing_a_padded_row_equals_the_document_alone():
    doc = profile(50).float()
    padded = torch.cat([doc, torch.full((20,), 99.0)])[None]
    smoothed = smooth_entropy(padded, rollout_len=5, lengths=torch.tensor([50]))
    alone = smooth_entropy(doc[None], rollout_len=5)
    assert torch.allclose(smoothed[0, :50], alone[0])
    assert (smoothed[0, 50:] == 0).all()


def test_entropy_positions_follow_softmax_of_smoothed_entropy_within_each_chunk():
    tau = 0.7
    entropy = profile(L)[None].expand(DRAWS, -1).contiguous()
    gen = torch.Generator().manual_seed(1234)
    positions = select_positions(entropy, num_chunks=C, rollout_len=K, temperature=tau, margin=MARGIN, generator=gen)
    assert positions.shape == (DRAWS, C)

    smoothed = smooth_entropy(profile(L)[None], K)[0]
    stat, df, smallest = chi_square(positions, expected_position_pmf(smoothed / tau, L, C, K, MARGIN))
    assert smallest >= 5, "the design must keep every expected count >= 5 for the chi-square approximation"
    # Fixed seed; under the right distribution a p-value below 1e-3 has probability 1e-3.
    assert chi2_sf(stat, df) > 1e-3, (stat, df)

    # The same draws must be rejected against the unsmoothed softmax (the test has power).
    stat_raw, df_raw, _ = chi_square(positions, expected_position_pmf(profile(L) / tau, L, C, K, MARGIN))
    assert chi2_sf(stat_raw, df_raw) < 1e-6, (stat_raw, df_raw)


def test_uniform_positions_are_uniform_within_each_chunk():
    entropy = profile(L)[None].expand(DRAWS, -1).contiguous()
    gen = torch.Generator().manual_seed(99)
    positions = select_positions(entropy, num_chunks=C, rollout_len=K, strategy="uniform", margin=MARGIN, generator=gen)
    stat, df, _ = chi_square(positions, expected_position_pmf(torch.zeros(L), L, C, K, MARGIN))
    assert chi2_sf(stat, df) > 1e-3, (stat, df)


def test_argmax_and_argmin_use_raw_entropy_and_start_after_the_chosen_token():
    entropy = torch.ones(1, 200)
    entropy[0, 73] = 9.0  # chunk 1 of 4 (size 50): argmax index 73 -> position 74
    entropy[0, 74:77] = 8.5  # would win after smoothing (kernel 5), must not win on raw entropy
    entropy[0, 120] = -3.0  # chunk 2 minimum
    argmax = select_positions(entropy, num_chunks=4, rollout_len=5, strategy="argmax")
    assert argmax[0, 1].item() == 74
    argmin = select_positions(entropy, num_chunks=4, rollout_len=5, strategy="argmin")
    assert argmin[0, 2].item() == 121
    # Ties resolve to the first index of the chunk: chunk 0 is flat -> index 0 -> p = 1 -> clamped to 20.
    assert argmin[0, 0].item() == 20


def test_clamping_keeps_margin_and_room_for_k_ground_truth_tokens():
    entropy = torch.zeros(2, 200)
    entropy[:, 0] = 10.0  # chunk 0 max at index 0
    entropy[:, 199] = 10.0  # chunk 3 max at the last index
    positions = select_positions(entropy, num_chunks=4, rollout_len=5, strategy="argmax", margin=20)
    assert positions[:, 0].tolist() == [20, 20]
    assert positions[:, 3].tolist() == [180, 180]

    # k larger than the margin: the end clamp becomes L - k so input_ids[p:p+k] exists.
    positions = select_positions(entropy, num_chunks=4, rollout_len=8, strategy="argmax", margin=2)
    assert positions[:, 3].tolist() == [192, 192]


def test_positions_stay_in_their_chunk_and_clamp_range_for_mixed_lengths():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([300, 97, 41, 256])
    entropy = torch.rand(4, 300, generator=gen) * 3
    for strategy in ("entropy", "uniform", "argmax", "argmin"):
        positions = select_positions(entropy, lengths, num_chunks=3, rollout_len=6, strategy=strategy, generator=gen)
        for b, length in enumerate(lengths.tolist()):
            size = length // 3
            low, high = 20, length - 20
            for j, p in enumerate(positions[b].tolist()):
                assert low <= p <= high
                unclamped_ok = j * size + 1 <= p <= (j + 1) * size
                assert unclamped_ok or p in (low, high), (strategy, b, j, p)


def test_same_seed_same_positions_and_list_input_matches_padded():
    entropy = torch.rand(3, 400, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([400, 333, 150])
    run = lambda seed, e=entropy, n=lengths: select_positions(  # noqa: E731
        e, n, num_chunks=8, rollout_len=5, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    docs = [entropy[b, : int(n)] for b, n in enumerate(lengths)]
    assert torch.equal(run(7, docs, None), run(7))


def test_low_temperature_concentrates_on_the_smoothed_maximum():
    entropy = profile(L)[None].expand(200, -1).contiguous()
    gen = torch.Generator().manual_seed(3)
    positions = select_positions(entropy, num_chunks=C, rollout_len=K, temperature=1e-4, generator=gen)
    smoothed = smooth_entropy(profile(L)[None], K)[0]
    size = L // C
    best = [j * size + int(smoothed[j * size : (j + 1) * size].argmax()) + 1 for j in range(C)]
    best = [min(max(p, MARGIN), L - MARGIN) for p in best]
    assert (positions == torch.tensor(best)).all()


def test_too_short_document_is_refused_with_its_index_and_length():
    assert min_document_length(8, 5, 20) == 40
    entropy = torch.rand(2, 200)
    with pytest.raises(ValueError, match=r"document 1 has length 39.*at least 40"):
        select_positions(entropy, torch.tensor([200, 39]), num_chunks=8, rollout_len=5)
    with pytest.raises(ValueError, match="document 0 has length 7"):
        select_positions(torch.rand(1, 7), num_chunks=8, rollout_len=1, margin=0)


def test_bad_arguments_are_named():
    entropy = torch.rand(1, 100)
    with pytest.raises(ValueError, match="strategy"):
        select_positions(entropy, num_chunks=2, rollout_len=5, strategy="max")
    with pytest.raises(ValueError, match="temperature"):
        select_positions(entropy, num_chunks=2, rollout_len=5, temperature=0.0)
    with pytest.raises(ValueError, match="num_chunks must be a whole number >= 1, got 0"):
        select_positions(entropy, num_chunks=0, rollout_len=5)
    with pytest.raises(ValueError, match="rollout_len must be a whole number, got 5.0"):
        select_positions(entropy, num_chunks=2, rollout_len=5.0)
    with pytest.raises(ValueError, match="margin must be a whole number >= 0, got -1"):
        select_positions(entropy, num_chunks=2, rollout_len=5, margin=-1)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 101"):
        select_positions(entropy, torch.tensor([101]), num_chunks=2, rollout_len=5)
    bad = entropy.clone()
    bad[0, 50] = float("nan")
    with pytest.raises(ValueError, match="document 0 .* index 50"):
        select_positions(bad, num_chunks=2, rollout_len=5)
    with pytest.raises(ValueError, match=r"entropy: shape \[0, 100\], a batch needs at least one document"):
        select_positions(torch.rand(0, 100), num_chunks=2, rollout_len=5)


def test_token_entropy_values():
    vocab = 7
    uniform = torch.zeros(2, 3, vocab)
    assert torch.allclose(token_entropy(uniform), torch.full((2, 3), math.log(vocab)))

    one_hot = torch.full((1, vocab), float("-inf"))
    one_hot[0, 2] = 0.0
    assert token_entropy(one_hot).item() == 0.0  # no NaN from 0 * log 0

    logits = torch.randn(4, 5, vocab, generator=torch.Generator().manual_seed(0)) * 4
    p = torch.softmax(logits.double(), -1)
    reference = -(p * p.log()).sum(-1)
    assert torch.allclose(token_entropy(logits, rows_per_chunk=3).double(), reference, atol=1e-5)
    assert torch.allclose(token_entropy(logits.double()), reference, atol=1e-12)

    huge = torch.tensor([[1e4, 0.0, -1e4]])  # naive exp would overflow
    assert token_entropy(huge).item() == pytest.approx(0.0, abs=1e-6)

    grad_logits = logits.clone().requires_grad_(True)
    assert not token_entropy(grad_logits).requires_grad
    assert token_entropy(logits.bfloat16()).dtype == torch.float32


def test_a_row_of_non_finite_logits_has_a_nan_entropy_that_selection_refuses():
    """A NaN or +Inf logit makes its row's entropy NaN (it was 0, the lowest score, so positions were drawn around
    such rows and a chunk of them drew one at random); masked (-inf) logits still contribute 0. select_positions
    then refuses the batch with NonFiniteOutputError, which a training step counts as a skipped step."""
    logits = torch.randn(1, 48, 5, generator=torch.Generator().manual_seed(0))
    logits[0, 3, 1] = float("-inf")
    logits[0, 20, 2] = float("nan")
    logits[0, 30, 0] = float("inf")
    entropy = token_entropy(logits)
    assert torch.isnan(entropy[0, 20]) and torch.isnan(entropy[0, 30])
    finite = torch.ones(48, dtype=torch.bool)
    finite[[20, 30]] = False
    assert torch.isfinite(entropy[0, finite]).all()
    p = torch.softmax(logits[0, 3, [0, 2, 3, 4]].double(), -1)
    assert entropy[0, 3].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
    assert torch.isnan(token_entropy(torch.full((1, 4), float("-inf")))).all()  # no distribution at all

    with pytest.raises(NonFiniteOutputError, match=r"^entropy must be finite; document 0 has nan at index 20$"):
        select_positions(entropy, num_chunks=4, rollout_len=2, margin=1, generator=torch.Generator().manual_seed(0))
    # Past a document's length, the padding's entropies are never read.
    padded = torch.cat([entropy[:, :20], torch.full((1, 28), float("nan"))], dim=1)
    positions = select_positions(padded, torch.tensor([20]), num_chunks=4, rollout_len=2, margin=1)
    assert positions.shape == (1, 4) and int(positions.max()) < 20
