"""One step's optimizer updates: non-finite steps are skipped, mini-batches and micro-batches take the whole
batch's update, a run whose steps all skip stops."""

import json
import re

import pytest
import torch
from test_loop import _config, _rows

from refine.algorithm.losses import ntp_loss
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import LossResult, advantages_for, refine_loss, score_rollouts
from refine.checkpoints import latest_checkpoint
from refine.config import load_config
from refine.config_parsing import ConfigError
from refine.data.batches import DocumentBatch
from refine.loop import prepare_model, train
from refine.models import build_model, load_model
from refine.step import (
    MAX_SKIPPED_IN_A_ROW, Divergence, StepResult, make_optimizer, merge_steps, mini_batch_bounds, optimizer_step,
    rollout_batch_update, train_step,
)


def test_non_finite_steps_are_skipped_and_counted():
    model = build_model(dict(model_type="delta_net", hidden_size=16, num_heads=2, num_hidden_layers=1, vocab_size=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    bad = model.lm_head.weight.sum() * float("nan")
    backward_ran = []
    hook = model.lm_head.weight.register_hook(lambda grad: backward_ran.append(True))
    outcome = optimizer_step(model, optimizer, LossResult(bad, bad, bad, {}), grad_clip=1.0)
    hook.remove()
    assert outcome.skipped and outcome.stats["skipped_nonfinite"] == 1.0
    # A non-finite loss is skipped before its backward: no gradient is computed, and the step reports no
    # grad_norm (a NaN one would poison merge_steps's mean over the steps that report it).
    assert not backward_ran and "grad_norm" not in outcome.stats
    assert all(parameter.grad is None for parameter in model.parameters())
    # A finite loss whose gradient is not finite is skipped too.
    hook = model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))
    finite = model(torch.tensor([[1, 2, 3]])).logits.square().mean()
    assert torch.isfinite(finite)
    outcome = optimizer_step(model, optimizer, LossResult(finite, finite, finite, {}), grad_clip=1.0)
    hook.remove()
    assert outcome.skipped and outcome.stats["skipped_nonfinite"] == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _uneven_documents(tmp_path):
    source = tmp_path / "uneven.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i}: " + "words of text " * (8 + 5 * i)}) + "\n"
                              for i in range(8)))
    return source


@pytest.mark.parametrize("mode,mini_batches", [("onepass", 1), ("onepass", 2), ("reference", 1), ("ntp", 2)])
def test_micro_batches_take_the_whole_batchs_update(tmp_path, mode, mini_batches):
    """Gradient accumulation is exact: the same steps (float64, to rounding) as the whole (mini-)batch at once,
    with documents of unequal lengths; the stats are the whole batch's too."""
    common = (f"data.source={_uneven_documents(tmp_path)}", "data.min_length=64", "train.dtype=float64",
              "train.batch_size=4", f"train.mini_batches={mini_batches}")
    for name, micro in (("whole", 1), ("micro", 4 // mini_batches)):
        train(_config(tmp_path / name, mode, steps=3, extra=(*common, f"train.micro_batches={micro}")), progress=False)
    whole, micro = _rows(tmp_path / "whole"), _rows(tmp_path / "micro")
    keys = [key for key in whole[0] if not key.endswith("_seconds") and key in micro[0]]
    assert {"loss", "ntp_loss", "grad_norm"} <= set(keys) and set(whole[0]) - set(micro[0]) == set()
    for before, after in zip(whole, micro):
        assert {key: after[key] for key in keys} == pytest.approx({key: before[key] for key in keys}, rel=1e-9,
                                                                     abs=1e-12)
    a = load_model(tmp_path / "whole" / "checkpoints/latest/model").state_dict()
    b = load_model(tmp_path / "micro" / "checkpoints/latest/model").state_dict()
    assert max(float((a[name] - b[name]).abs().max()) for name in a) < 1e-12


def test_a_non_finite_slice_stops_the_backward_passes_but_not_the_stats():
    """A non-finite slice skips the step; the slices after it still run forward (without gradient), so the row's
    stats are the whole batch's, as an undivided step reports them, not those of the slices before the bad one."""
    from refine.algorithm.update import SliceShares
    from refine.step import backward_slices

    weight = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    graphs = []

    def loss_of(start: int, end: int):
        loss = weight * start if start != 1 else weight * float("nan")
        graphs.append(torch.is_grad_enabled())
        stats = {"ntp_loss": float(start), "policy_loss": 10.0 * start}
        return LossResult(loss, loss.detach(), loss.detach(), stats), SliceShares(ntp=1 / 3, policy=1 / 3)

    stats, finite = backward_slices([(0, 1), (1, 2), (2, 3)], loss_of, load_config(None, []).refine)
    assert not finite and graphs == [True, True, False]  # the slice after the bad one: forward only
    assert stats["ntp_loss"] == pytest.approx(1.0) and stats["policy_loss"] == pytest.approx(10.0)
    assert float(weight.grad) == 0.0  # slice 0's gradient (0); slice 1 was not backpropagated


def test_micro_batches_are_refused_where_the_step_cannot_take_them(tmp_path):
    with pytest.raises(ValueError, match="train.micro_batches=2 needs train.mode 'onepass', 'reference' or 'ntp'"):
        train(_config(tmp_path, "fused", extra=("train.micro_batches=2",)), progress=False)
    with pytest.raises(ConfigError, match=r"train.micro_batches=2 x train.mini_batches=2 is more than "
                                          r"train.batch_size=2"):
        _config(tmp_path, "onepass", extra=("train.micro_batches=2", "train.mini_batches=2"))


def test_mini_batch_bounds_cover_the_batch_in_near_equal_contiguous_runs():
    for documents in range(1, 9):
        for count in range(1, documents + 1):
            bounds = mini_batch_bounds(documents, count)
            assert [i for start, end in bounds for i in range(start, end)] == list(range(documents))
            sizes = [end - start for start, end in bounds]
            assert len(sizes) == count and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert mini_batch_bounds(2, 3) == [(0, 1), (1, 2)]  # a short last batch: one document per mini-batch
    with pytest.raises(ValueError, match=r"cannot split 0 documents into train.mini_batches=2"):
        mini_batch_bounds(0, 2)


def _scored_batch():
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=40, hidden_size=32, num_hidden_layers=1, num_heads=2,
                             intermediate_size=32), dtype=torch.float64)
    config = load_config(None, ["train.batch_size=3", "train.mini_batches=2", "optim.lr=0.05", "refine.num_chunks=2",
                                "refine.margin=4", "refine.num_samples=2", "data.min_length=30"])
    ids = torch.randint(0, 40, (3, 90), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([90, 60, 75])
    rollouts = snapshot_rollouts(model, ids, lengths, config.refine, torch.Generator().manual_seed(2))
    rollouts.rewards = score_rollouts(rollouts, config.refine)
    return model, config, ids, lengths, rollouts


@pytest.mark.parametrize("mode", ["onepass", "reference"])
def test_mini_batches_are_optimizer_steps_in_turn_on_the_rollouts_sampled_before_the_first(mode):
    model, config, ids, lengths, rollouts = _scored_batch()
    outcome = rollout_batch_update(mode, model, make_optimizer(model, config.optim), ids, lengths, rollouts, config)

    expected, _, _, _, _ = _scored_batch()
    optimizer = make_optimizer(expected, config.optim)
    advantages = advantages_for(rollouts.rewards, rollouts, config.refine)  # over the whole batch
    by_hand = []
    for (start, end), (lo, hi) in zip([(0, 2), (2, 3)], [(0, 8), (8, 12)]):  # 2 chunks x 2 samples per document
        result = refine_loss(mode, expected, ids[start:end], lengths[start:end], rollouts.documents(start, end),
                             advantages[lo:hi], config.refine)
        by_hand.append(optimizer_step(expected, optimizer, result, config.optim.grad_clip))
    for got, want in zip(model.state_dict().values(), expected.state_dict().values()):
        torch.testing.assert_close(got, want)
    assert outcome.stats["loss"] == pytest.approx((by_hand[0].stats["loss"] + by_hand[1].stats["loss"]) / 2)
    # The first mini-batch is on-policy; the second trains on rollouts of the weights before the first step.
    assert by_hand[0].stats["pg/approx_kl"] == pytest.approx(0.0, abs=1e-12)
    assert abs(by_hand[1].stats["pg/approx_kl"]) > 1e-6
    assert outcome.stats["pg/approx_kl"] == pytest.approx(by_hand[1].stats["pg/approx_kl"] / 2)


def test_a_run_with_mini_batches_trains_and_a_fused_run_refuses_them(tmp_path):
    stats = train(_config(tmp_path / "a", "onepass", extra=("train.mini_batches=2",)), progress=False)
    assert stats["step"] == 2 and "pg/approx_kl" in stats
    with pytest.raises(ValueError, match=r"train.mini_batches=2 needs train.mode 'onepass' or 'reference'.*samples "
                                         r"them in every update"):
        train(_config(tmp_path / "fused", "fused", extra=("train.mini_batches=2",)), progress=False)
    assert not (tmp_path / "fused").exists()  # refused before anything is written


def test_ntp_mini_batches_are_as_many_optimizer_steps_on_runs_of_the_documents(tmp_path):
    """So that the main job's NTP branch takes as many updates as its REFINE branch."""
    config = _config(tmp_path, "ntp", extra=("train.mini_batches=2", "train.batch_size=3"))
    model = prepare_model(config)
    expected = prepare_model(config)
    optimizer, by_hand = make_optimizer(model, config.optim), make_optimizer(expected, config.optim)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    batch = DocumentBatch(ids, torch.tensor([40, 30, 35]), ["a", "b", "c"])
    outcome = train_step(model, optimizer, batch, config, torch.Generator())
    losses = []
    for start, end in [(0, 2), (2, 3)]:  # mini_batch_bounds(3, 2)
        loss = ntp_loss(expected(ids[start:end], lengths=batch.lengths[start:end], output_state=False).logits,
                        ids[start:end], batch.lengths[start:end])
        losses.append(float(loss.detach()))
        optimizer_step(expected, by_hand, LossResult(loss, loss, loss.new_zeros(()), {}), config.optim.grad_clip)
    assert outcome.stats["ntp_loss"] == pytest.approx(sum(losses) / 2)
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    assert optimizer.state_dict()["state"][0]["step"] == 2


def test_merged_steps_average_each_stat_over_the_steps_that_report_it():
    skipped = StepResult({"loss": 5.0, "skipped_nonfinite": 1.0}, True)
    taken = StepResult({"loss": 3.0, "grad_norm": 2.0}, False)
    merged = merge_steps([skipped, taken])
    assert merged.skipped and merged.stats == {"loss": 4.0, "skipped_nonfinite": 0.5, "grad_norm": 2.0}


def test_steps_skipped_after_trained_ones_say_the_weights_diverged_naming_the_rates(tmp_path):
    config = _config(tmp_path, "onepass", steps=100, extra=("optim.warmup_steps=20",))
    divergence = Divergence(config)
    assert divergence.add(1, {"skipped_nonfinite": 0.0}) is None
    errors = [divergence.add(step, {"skipped_nonfinite": 1.0}) for step in range(2, 2 + MAX_SKIPPED_IN_A_ROW)]
    assert errors[:-1] == [None] * (MAX_SKIPPED_IN_A_ROW - 1)
    assert str(errors[-1]).startswith(
        f"steps 2..{MAX_SKIPPED_IN_A_ROW + 1} were all skipped for a non-finite loss or gradient: the weights have "
        f"diverged (learning rate 0.00055 at step 11, optim.lr=0.001 with optim.warmup_steps=20, "
        f"optim.schedule='constant': each step's rate is its lr in metrics.jsonl; optim.grad_clip=1.0")


def test_only_fully_skipped_steps_in_a_row_count_towards_divergence(tmp_path):
    """A step some of whose mini-batches trained (skipped_nonfinite < 1) moved the weights, and a trained step
    starts the count over: neither ends a run, however many of them come."""
    config = _config(tmp_path, "onepass", steps=100)
    divergence = Divergence(config)
    assert [divergence.add(step, {"skipped_nonfinite": 0.5}) for step in range(1, 2 * MAX_SKIPPED_IN_A_ROW)] == \
        [None] * (2 * MAX_SKIPPED_IN_A_ROW - 1)
    steps = range(2 * MAX_SKIPPED_IN_A_ROW, 4 * MAX_SKIPPED_IN_A_ROW)
    assert [divergence.add(step, {"skipped_nonfinite": float(step % 2 == 0)}) for step in steps] == [None] * len(steps)
    last = 4 * MAX_SKIPPED_IN_A_ROW
    errors = [divergence.add(step, {"skipped_nonfinite": 1.0}) for step in range(last, last + MAX_SKIPPED_IN_A_ROW)]
    assert errors[:-1] == [None] * (MAX_SKIPPED_IN_A_ROW - 1)
    assert str(errors[-1]).startswith(f"steps {last}..{last + MAX_SKIPPED_IN_A_ROW - 1} were all skipped")


def test_a_run_shorter_than_the_limit_whose_every_step_is_skipped_ends_with_the_error(tmp_path):
    """Three steps, all skipped: it exited 0 with a checkpoint of the weights it started from and a warning."""
    config = _config(tmp_path, "onepass", steps=3, extra=("refine.lambda_ntp=1e300",))
    with pytest.raises(ValueError, match=r"^steps 1..3 were all skipped for a non-finite loss or gradient, from the "
                                         r"first: the loss is not finite at the weights the run started from"):
        train(config, progress=False)
    assert not latest_checkpoint(tmp_path).exists()
    divergence = Divergence(config)  # one step taken among them: not an error
    assert [divergence.add(step, {"skipped_nonfinite": float(step != 2)}) for step in (1, 2, 3)] == [None] * 3


def test_a_run_whose_every_step_is_skipped_stops_naming_the_loss_weights_and_keeps_no_checkpoint(tmp_path, capsys):
    """Every step skipped for a non-finite loss: after MAX_SKIPPED_IN_A_ROW of them the run ends with an error,
    instead of finishing as a success whose weights never moved. From the first step, no learning rate is to blame
    (it was named, as "the weights have diverged"): the loss weights overflow the dtype."""
    config = _config(tmp_path, "onepass", steps=MAX_SKIPPED_IN_A_ROW + 5,
                     extra=("refine.lambda_ntp=1e300", "optim.warmup_steps=20"))
    with pytest.raises(ValueError, match=re.escape(
            f"steps 1..{MAX_SKIPPED_IN_A_ROW} were all skipped for a non-finite loss or gradient, from the first: the "
            f"loss is not finite at the weights the run started from, so check the loss weights (refine.lambda_ntp="
            f"1e+300, lambda_nsp=0.2, kl_coef=0: train.dtype=float32 holds at most 3.4e+38) or the starting weights")):
        train(config, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, MAX_SKIPPED_IN_A_ROW + 1))
    assert not latest_checkpoint(tmp_path).exists()  # nothing worth keeping was written


def _nan_logits(model, where: str):
    """A forward hook on lm_head that makes the model's logits NaN: over the second half of the document pass
    (where="document": a recurrent state gone NaN stays NaN to the document's end) or in every one-token decode
    step (where="decode"), the document's own logits finite."""
    def hook(module, inputs, output):
        if where == "document" and output.dim() == 3 and output.shape[1] > 8:
            output = output.clone()
            output[:, output.shape[1] // 2:] = float("nan")
            return output
        if where == "decode" and output.dim() == 3 and output.shape[1] == 1:
            return torch.full_like(output, float("nan"))
        return None
    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("where", ["document", "decode"])
@pytest.mark.parametrize("mode", ["fused", "onepass", "reference"])
def test_a_step_whose_logits_are_not_finite_is_skipped_and_counted(tmp_path, mode, where):
    """NaN logits where positions are selected or rollouts sampled (weights gone bad in bfloat16, an overflow) end
    the step as a non-finite loss does: skipped, counted (nonfinite_logits says why), the weights and the optimizer
    untouched. They raised out of the step, ending the run on a single batch (the NTP loss over them skips it)."""
    config = _config(tmp_path, mode)
    model = prepare_model(config)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = make_optimizer(model, config.optim)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    batch = DocumentBatch(ids, torch.tensor([64, 50]), ["a", "b"])
    hook = _nan_logits(model, where)
    try:
        outcome = train_step(model, optimizer, batch, config, torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    assert outcome.skipped and outcome.stats == {"skipped_nonfinite": 1.0, "nonfinite_logits": 1.0}
    assert all(parameter.grad is None for parameter in model.parameters()) and not optimizer.state
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    # The same batch without the fault trains.
    assert not train_step(model, optimizer, batch, config, torch.Generator().manual_seed(1)).skipped
