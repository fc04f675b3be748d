"""The learning-rate schedule; float32 master weights for low-precision models: the steps of a float32 AdamW,
rounded into the model."""

import math

import pytest
import torch

from refine.config import OptimConfig
from refine.models import build_model
from pydantic import ValidationError

from refine.optim import MasterWeightAdamW, clip_gradients, learning_rate, set_learning_rate
from refine.step import make_optimizer

OPTIONS = dict(lr=1e-6, weight_decay=0.01, betas=(0.9, 0.999))


def _grads(step: int, shapes: list[torch.Size]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    # bfloat16-representable, so the float32 reference and the bfloat16 model see the same gradient.
    return [torch.randn(shape, generator=generator).bfloat16().float() for shape in shapes]


def _run(steps: int, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], first: int = 0) -> None:
    for step in range(first, first + steps):
        optimizer.zero_grad()
        for param, grad in zip(params, _grads(step, [p.shape for p in params])):
            param.grad = grad.to(param.dtype)
        optimizer.step()


def test_bfloat16_weights_follow_the_float32_adamw_trajectory():
    torch.manual_seed(0)
    reference = [torch.nn.Parameter(torch.randn(16, 8) * 0.02), torch.nn.Parameter(torch.randn(8))]
    model = [torch.nn.Parameter(p.detach().bfloat16()) for p in reference]
    reference = [torch.nn.Parameter(p.detach().bfloat16().float()) for p in reference]  # the same start
    masters = MasterWeightAdamW(model, **OPTIONS)
    _run(20, torch.optim.AdamW(reference, **OPTIONS), reference)
    _run(20, masters, model)
    for master, ref, param in zip(masters.masters, reference, model):
        assert torch.equal(master, ref.detach())  # exactly float32 AdamW
        assert torch.equal(param.detach(), ref.detach().bfloat16())  # the model holds it, rounded
    # A plain bfloat16 AdamW loses these updates: lr 1e-6 is far below a bfloat16 weight's spacing.
    plain = [torch.nn.Parameter(p.detach().bfloat16().float().bfloat16()) for p in reference]
    start = [p.detach().clone() for p in plain]
    _run(20, torch.optim.AdamW(plain, **OPTIONS), plain)
    moved = sum(int((p.detach() != s).sum()) for p, s in zip(plain, start))
    moved_master = sum(int((m != s.float()).sum()) for m, s in zip(masters.masters, start))
    assert moved < moved_master / 4


def test_state_dict_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    start = [torch.randn(4, 4) * 0.02]
    straight = [torch.nn.Parameter(start[0].bfloat16())]
    optimizer = MasterWeightAdamW(straight, **OPTIONS)
    _run(5, optimizer, straight)

    first = [torch.nn.Parameter(start[0].bfloat16())]
    optimizer = MasterWeightAdamW(first, **OPTIONS)
    _run(3, optimizer, first)
    torch.save({"model": first[0].detach(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # tensors and numbers only
    resumed = [torch.nn.Parameter(saved["model"].clone())]
    optimizer = MasterWeightAdamW(resumed, **OPTIONS)
    optimizer.load_state_dict(saved["optimizer"])
    _run(2, optimizer, resumed, first=3)
    assert torch.equal(resumed[0].detach(), straight[0].detach())


def test_make_optimizer_keeps_masters_only_for_low_precision_models():
    model = build_model(dict(model_type="delta_net", hidden_size=16, num_heads=2, num_hidden_layers=1, vocab_size=10))
    assert type(make_optimizer(model, OptimConfig())) is torch.optim.AdamW
    optimizer = make_optimizer(model.to(torch.bfloat16), OptimConfig())
    assert isinstance(optimizer, MasterWeightAdamW)
    assert all(m.dtype == torch.float32 for m in optimizer.masters)
    with pytest.raises(ValueError, match="master weights"):
        optimizer.load_state_dict(optimizer.state_dict() | {"master_weights": []})


def test_masters_hold_no_gradients_between_steps():
    param = torch.nn.Parameter(torch.full((4,), 0.02).bfloat16())
    optimizer = MasterWeightAdamW([param], **OPTIONS)
    _run(1, optimizer, [param])
    assert optimizer.masters[0].grad is None  # the float32 gradient copy is freed after the step


# ---------------------------------------------------------------- learning-rate schedule


def test_the_constant_schedule_is_lr_after_a_linear_warm_up():
    assert [learning_rate(OptimConfig(lr=0.1), step, 5) for step in range(1, 6)] == [0.1] * 5
    warm = OptimConfig(lr=0.1, warmup_steps=4)
    assert [learning_rate(warm, step, 6) for step in range(1, 7)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_the_cosine_schedule_runs_from_lr_after_the_warm_up_to_min_lr_at_the_last_step():
    cosine = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=2, min_lr_ratio=0.2)
    # Steps 3..7 are at progress 0, 1/5 .. 4/5: the minimum would come at step 8, so no step trains at it.
    expected = [0.05, 0.1] + [0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
    assert [learning_rate(cosine, step, 7) for step in range(1, 8)] == pytest.approx(expected)
    assert expected[2] == 0.1 and expected[4] == pytest.approx(0.02 + 0.08 * 0.5 * (1 + (5 ** 0.5 - 1) / 4))
    assert learning_rate(OptimConfig(lr=0.1, schedule="cosine"), 2, 2) == pytest.approx(0.05)  # min 0: not 0
    # The warm-up's last step is exactly lr (lr x 3 / 3 in floats is not).
    assert learning_rate(OptimConfig(lr=0.1, warmup_steps=3), 3, 5) == 0.1
    # Past train.steps (a resume that lowered it) the rate stays at its end; one step after the warm-up is lr.
    assert learning_rate(cosine, 9, 7) == pytest.approx(0.02)
    assert learning_rate(OptimConfig(lr=0.1, schedule="cosine"), 1, 1) == 0.1


def test_set_learning_rate_sets_every_group():
    model = build_model(dict(model_type="delta_net", vocab_size=32, hidden_size=16, num_hidden_layers=1,
                             num_heads=2, intermediate_size=32))
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3))
    set_learning_rate(optimizer, 2.5e-4)
    assert [group["lr"] for group in optimizer.param_groups] == [2.5e-4] * len(optimizer.param_groups)


def test_schedule_settings_are_checked_naming_the_field():
    with pytest.raises(ValidationError, match="optim.min_lr_ratio=0.1 is the learning rate the cosine schedule "
                                              "decays towards, but optim.schedule='constant' does not decay"):
        OptimConfig(min_lr_ratio=0.1)
    for bad in (dict(warmup_steps=-1), dict(schedule="linear"), dict(schedule="cosine", min_lr_ratio=1.5)):
        with pytest.raises(ValidationError):
            OptimConfig(**bad)


def _gradients(dtype):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in [(64, 48), (48,), (300,)]]
    for param in params:
        param.grad = (torch.randn(param.shape, dtype=torch.float64) * 3).to(dtype)
    return params


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_clip_gradients_takes_the_norm_in_float32_at_least_and_scales_to_max_norm(dtype):
    params = _gradients(dtype)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]))
    before = [p.grad.clone() for p in params]
    norm = clip_gradients(params, max_norm=1.0)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(norm.double(), exact, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    for param, grad in zip(params, before):  # each scaled by max_norm / norm, then rounded to its dtype
        torch.testing.assert_close(param.grad, (grad.double() / (exact + 1e-6)).to(dtype))
    if dtype != torch.bfloat16:  # torch's own clip agrees where the dtype holds the norm
        reference = _gradients(dtype)
        torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(reference, 1.0), norm, rtol=1e-12, atol=0)
        for param, want in zip(params, reference):
            torch.testing.assert_close(param.grad, want.grad, rtol=1e-12, atol=0)


def test_clip_gradients_leaves_gradients_under_max_norm_and_non_finite_ones_alone():
    params = _gradients(torch.float32)
    before = [p.grad.clone() for p in params]
    norm = clip_gradients(params, max_norm=1e6)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before)) and 0 < float(norm) < 1e6
    params[1].grad[3] = float("nan")
    assert math.isnan(float(clip_gradients(params, max_norm=1.0)))
    assert torch.equal(params[0].grad, before[0])
