import math

import pytest
import torch

from refine.algorithm.losses import aggregate_loss, kl_penalty, ntp_loss, policy_loss

# Five one-token rollouts, old log-prob 0, new log-prob log(r); clip 0.2, dual clip 3.
RATIOS = [1.5, 0.5, 0.5, 5.0, 1.0]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0, -2.0]
# Per token, max(-A r, -A clip(r, 0.8, 1.2)), then min(., -3A) where A < 0:
#   r=1.5 A=+1: max(-1.5, -1.2) = -1.2   (clip active)
#   r=0.5 A=+1: max(-0.5, -0.8) = -0.5
#   r=0.5 A=-1: max( 0.5,  0.8) =  0.8   (clip active; below the dual bound 3)
#   r=5   A=-1: max( 5.0,  1.2) =  5.0 -> min(5, 3) = 3   (dual clip active)
#   r=1   A=-2: max( 2.0,  2.0) =  2.0
PER_TOKEN = [-1.2, -0.5, 0.8, 3.0, 2.0]


def one_token_batch():
    new = torch.tensor(RATIOS, dtype=torch.float64).log()[:, None].requires_grad_(True)
    old = torch.zeros(5, 1, dtype=torch.float64)
    return new, old, torch.tensor(ADVANTAGES, dtype=torch.float64)


def test_clipped_dual_clipped_loss_and_stats_by_hand():
    new, old, adv = one_token_batch()
    loss, stats = policy_loss(new, old, adv)
    assert loss.item() == pytest.approx(sum(PER_TOKEN) / 5)  # 4.1 / 5 = 0.82
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    assert stats["dual_clip_fraction"].item() == pytest.approx(1 / 5)
    # approx KL = mean(old - new) = -(ln 1.5 + 2 ln 0.5 + ln 5 + 0) / 5 = -0.125722
    assert stats["approx_kl"].item() == pytest.approx(-sum(math.log(r) for r in RATIOS) / 5)
    assert not stats["clip_fraction"].requires_grad

    # d loss / d new = -A r / 5 where the unclipped term is active, 0 where a clip is active.
    loss.backward()
    expected_grad = [0.0, -0.5 / 5, 0.0, 0.0, 2.0 / 5]
    assert new.grad[:, 0].tolist() == pytest.approx(expected_grad)


def test_without_dual_clip_and_with_asymmetric_clip():
    new, old, adv = one_token_batch()
    loss, stats = policy_loss(new, old, adv, dual_clip=None)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 5.0 + 2.0) / 5)  # 1.22
    assert stats["dual_clip_fraction"].item() == 0.0
    # clip_high 0.28: the r=1.5, A=+1 token becomes max(-1.5, -1.28) = -1.28.
    loss, _ = policy_loss(new, old, adv, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 3.0 + 2.0) / 5)


def test_clip_low_bounds_negative_advantages_and_clip_high_positive_ones() -> None:
    """Without this, swapping clip_low and clip_high (DAPO's clip-higher) goes unnoticed: the
    five-token batch above happens to give the same mean loss either way."""
    one = torch.zeros(1, 1, dtype=torch.float64)
    # r=1.5, A=+1: the upper bound 1 + clip_high = 1.28 applies: max(-1.5, -1.28) = -1.28.
    loss, _ = policy_loss(one + math.log(1.5), one, torch.tensor([1.0], dtype=torch.float64),
                          clip_low=0.2, clip_high=0.28, dual_clip=None)
    assert loss.item() == pytest.approx(-1.28)
    # r=0.5, A=-1: the lower bound 1 - clip_low = 0.8 applies: max(0.5, 0.8) = 0.8.
    loss, _ = policy_loss(one + math.log(0.5), one, torch.tensor([-1.0], dtype=torch.float64),
                          clip_low=0.2, clip_high=0.28, dual_clip=None)
    assert loss.item() == pytest.approx(0.8)


def test_aggregation_modes_with_a_mask():
    # Three rollouts of two tokens; per-token advantages; the r=5 token is masked out.
    new = torch.tensor([[1.5, 0.5], [0.5, 5.0], [1.0, 1.5]], dtype=torch.float64).log()
    old = torch.zeros(3, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [-2.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    # Per-token losses: [[-1.2, -0.5], [0.8, (3.0 masked)], [2.0, -1.2]].
    cases = {
        "token-mean": (-1.2 - 0.5 + 0.8 + 2.0 - 1.2) / 5,  # -0.02
        "seq-mean-token-mean": ((-1.2 - 0.5) / 2 + 0.8 / 1 + (2.0 - 1.2) / 2) / 3,  # 0.116667
        "seq-mean-token-sum": ((-1.2 - 0.5) + 0.8 + (2.0 - 1.2)) / 3,  # -0.033333
    }
    for agg, expected in cases.items():
        loss, stats = policy_loss(new, old, adv, mask, agg=agg)
        assert loss.item() == pytest.approx(expected), agg
        assert stats["clip_fraction"].item() == pytest.approx(3 / 5)  # the 1.5, 0.5 (A<0), 1.5 tokens
        assert stats["dual_clip_fraction"].item() == 0.0  # the dual-clipped token is masked


def test_sequence_advantages_equal_broadcast_token_advantages():
    gen = torch.Generator().manual_seed(0)
    new = torch.randn(6, 4, generator=gen) * 0.3
    old = torch.randn(6, 4, generator=gen) * 0.3
    adv = torch.randn(6, generator=gen)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        a, _ = policy_loss(new, old, adv, agg=agg)
        b, _ = policy_loss(new, old, adv[:, None].expand(-1, 4), agg=agg)
        assert torch.allclose(a, b)


def test_on_policy_loss_is_minus_mean_advantage():
    logp = torch.randn(4, 3)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0])
    loss, stats = policy_loss(logp, logp.clone(), adv)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["clip_fraction"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_kl_penalty_kinds_by_hand():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))  # 0.693147
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)  # 0.240227
    # k3: r = q/p = 0.5 -> r - log r - 1 = 0.5 + 0.693147 - 1 = 0.193147
    assert kl_penalty(logp, ref, "low_var_kl").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_penalty(logp, ref, "k3").item() == kl_penalty(logp, ref, "low_var_kl").item()
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([-100.0]), "k3").item() == 10.0  # verl's clamp
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, "k4")


def test_kl_term_is_added_to_the_policy_loss():
    new, old, adv = one_token_batch()
    ref = torch.zeros(5, 1, dtype=torch.float64)
    loss, stats = policy_loss(new, old, adv, ref_logprobs=ref, kl_coef=0.1, kl_kind="k1")
    kl = sum(math.log(r) for r in RATIOS) / 5
    assert stats["kl_loss"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(sum(PER_TOKEN) / 5 + 0.1 * kl)


def test_sequence_mean_counts_a_rollout_with_an_empty_mask_as_zero() -> None:
    """Without this, a rollout whose tokens are all masked (e.g. truncated to nothing) divides
    0 by 0 and turns the whole seq-mean-token-mean loss into NaN."""
    loss_mat = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [0, 0]])
    loss = aggregate_loss(loss_mat, mask, "seq-mean-token-mean")
    assert loss.item() == pytest.approx((2.0 + 0.0) / 2)


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="agg must be one of"):
        aggregate_loss(torch.zeros(2, 2), torch.ones(2, 2), "seq-sum")


def test_ntp_loss_by_hand_and_padding_ignored():
    # Vocabulary 2. Row 0 (length 3): logits at t=0 are [0, ln 3] -> p(1) = 3/4, target 1:
    # -ln(3/4) = 0.287682; at t=1 [0, 0], target 0: ln 2 = 0.693147. Row 1 (length 2): at t=0
    # [ln 3, 0] -> p(0) = 3/4, target 0: 0.287682. Mean over 3 targets = 0.422837.
    logits = torch.zeros(2, 3, 2, dtype=torch.float64)
    logits[0, 0, 1] = math.log(3)
    logits[1, 0, 0] = math.log(3)
    logits[1, 1] = torch.tensor([50.0, -50.0])  # predicts row 1's padding: must not count
    input_ids = torch.tensor([[5, 1, 0], [9, 0, -1]])  # leading ids are never targets; -1 is padding
    loss = ntp_loss(logits, input_ids, torch.tensor([3, 2]))
    expected = (2 * -math.log(0.75) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected)


def test_ntp_loss_matches_per_document_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 13, generator=gen, requires_grad=True)
    ids = torch.randint(0, 13, (3, 9), generator=gen)
    lengths = torch.tensor([9, 4, 6])
    loss = ntp_loss(logits, ids, lengths)
    total = sum(
        torch.nn.functional.cross_entropy(logits[b, : n - 1], ids[b, 1:n], reduction="sum")
        for b, n in enumerate(lengths.tolist())
    )
    assert torch.allclose(loss, total / (8 + 3 + 5))
    loss.backward()
    assert (logits.grad[1, 3:] == 0).all()  # positions past row 1's last target get no gradient
    with pytest.raises(ValueError, match="no next-token targets"):
        ntp_loss(logits, ids, torch.tensor([1, 1, 0]))


def test_argument_checks():
    new, old, adv = one_token_batch()
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(new, old, adv, dual_clip=1.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(new, old, adv[:3])
    with pytest.raises(ValueError, match="old_logprobs contains NaN"):
        policy_loss(new, torch.full_like(old, float("nan")), adv)
