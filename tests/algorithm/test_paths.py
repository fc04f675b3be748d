"""One-pass, fused and reference REFINE paths: same loss and same gradient for every parameter."""

import pytest
import torch

from refine.algorithm.losses import ntp_loss
from refine.algorithm.rollout import prefix_rows, snapshot_rollouts
from refine.algorithm.update import (
    _combine, advantages_for, fused_refine_step, refine_loss, teacher_forced_logprobs,
)
from refine.config import RefineConfig
from refine.models import build_model

MODELS = {
    "delta_net": dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=40,
                      intermediate_size=48, use_short_conv=True, use_gate=True),
    "gated_deltanet": dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16,
                           num_hidden_layers=2, vocab_size=40, intermediate_size=48),
    "lact": dict(model_type="lact_swiglu", vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attn_heads=4,
                 num_lact_heads=2, inter_multi=2, lact_chunk_size=16, window_size=8, intermediate_size=24,
                 use_momentum=True, use_muon=True),
}


def _model(name):
    torch.manual_seed(0)
    model = build_model(MODELS[name], dtype=torch.float64)
    with torch.no_grad():  # larger weights than the init so that the policy term is not negligible
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return model


def _batch():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([150, 97])
    ids = torch.randint(0, 40, (2, 150), generator=gen)
    ids[1, 97:] = 0
    # Positions inside chunks and on both sides of the 64-token kernel chunk edges.
    positions = torch.tensor([[1, 63, 64, 65, 128, 145], [20, 64, 65, 70, 90, 92]])
    return ids, lengths, positions


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_samples,temperature,top_p", [(1, 1.0, 1.0), (3, 1.0, 1.0), (3, 0.8, 0.9)])
def test_paths_agree(name, num_samples, temperature, top_p):
    # At temperature 1 a path that forgot the temperature would agree anyway: one case samples at 0.8.
    model = _model(name)
    ids, lengths, positions = _batch()
    cfg = RefineConfig(num_chunks=6, rollout_len=5, num_samples=num_samples, lambda_nsp=0.7, temperature=temperature,
                       top_p=top_p, clip_ratio_low=0.2, clip_ratio_high=0.3)

    model.zero_grad()
    fused, rollouts = fused_refine_step(model, ids, lengths, cfg, torch.Generator().manual_seed(5),
                                        positions=positions)
    fused.loss.backward()
    fused_grads = _grads(model)
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)
    assert advantages.abs().sum() > 0

    results = {}
    for mode in ("onepass", "reference"):
        model.zero_grad()
        result = refine_loss(mode, model, ids, lengths, rollouts, advantages, cfg)
        result.loss.backward()
        results[mode] = (result, _grads(model))

    for mode, (result, grads) in results.items():
        torch.testing.assert_close(result.loss, fused.loss, rtol=1e-6, atol=0, msg=mode)
        torch.testing.assert_close(result.policy_loss, fused.policy_loss, rtol=1e-6, atol=1e-12, msg=mode)
        for pname, grad in grads.items():
            torch.testing.assert_close(grad, fused_grads[pname], rtol=1e-6, atol=1e-12, msg=f"{mode}: {pname}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_kl_term_reads_the_reference_policy_of_each_prefix_and_rollout(name):
    """With kl_coef > 0 every path adds kl_coef * the token-mean low-variance KL between the policy and
    a frozen reference, both read literally here from full forwards over prefix + rollout."""
    model, reference = _model(name), _model(name)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(0.9)
    ids, lengths, positions = _batch()
    k, n, temperature = 5, 2, 0.8
    cfg = RefineConfig(num_chunks=6, rollout_len=k, num_samples=n, temperature=temperature, kl_coef=0.1)
    fused, rollouts = fused_refine_step(model, ids, lengths, cfg, torch.Generator().manual_seed(5),
                                        ref_model=reference, positions=positions)
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)
    without_kl = refine_loss("onepass", model, ids, lengths, rollouts, advantages, cfg.model_copy(update={"kl_coef": 0}))

    rows, starts = prefix_rows(positions)
    policy, frozen = [], []
    for i in range(rollouts.num_rollouts):
        row, start = int(rows[i // n]), int(starts[i // n])
        sequence = torch.cat([ids[row, :start], rollouts.tokens[i]])[None]
        for net, out in ((model, policy), (reference, frozen)):
            logits = net(sequence, output_state=False).logits[0, start - 1:start + k - 1].detach()
            out.append(torch.log_softmax(logits / temperature, -1).gather(-1, rollouts.tokens[i][:, None])[:, 0])
    log_ratio = torch.stack(frozen) - torch.stack(policy)
    expected_kl = (log_ratio.exp() - log_ratio - 1).clamp(-10, 10).mean()  # low_var_kl, token-mean
    assert expected_kl > 1e-4  # the two policies differ: the term is not trivially zero

    for mode in ("onepass", "reference"):
        result = refine_loss(mode, model, ids, lengths, rollouts, advantages, cfg, ref_model=reference)
        assert result.stats["pg/kl_loss"] == pytest.approx(float(expected_kl), rel=1e-6), mode
        torch.testing.assert_close(result.loss, fused.loss, rtol=1e-6, atol=0, msg=mode)
    assert fused.stats["pg/kl_loss"] == pytest.approx(float(expected_kl), rel=1e-6)
    torch.testing.assert_close(fused.loss - without_kl.loss, cfg.lambda_nsp * 0.1 * expected_kl, rtol=1e-6, atol=0)


def test_detached_states_would_be_caught():
    """Cutting the gradient through the carried states changes the gradient well beyond tolerance."""
    model = _model("delta_net")
    ids, lengths, positions = _batch()
    cfg = RefineConfig(num_chunks=6, rollout_len=5, num_samples=2, lambda_nsp=1.0)
    rollouts = snapshot_rollouts(model, ids, lengths, cfg, torch.Generator().manual_seed(1), positions=positions)
    rollouts.rewards = torch.randn(rollouts.num_rollouts, generator=torch.Generator().manual_seed(2),
                                   dtype=torch.float64)
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)

    model.zero_grad()
    refine_loss("reference", model, ids, lengths, rollouts, advantages, cfg).loss.backward()
    reference = _grads(model)

    model.zero_grad()
    out = model(ids, lengths=lengths, state_positions=positions, output_state=False)
    rows, starts = prefix_rows(positions)
    new = teacher_forced_logprobs(model, out.position_states.detach(), out.logits[rows, starts - 1],
                                  rollouts.tokens, rollouts.num_samples, cfg.temperature)
    _combine(ntp_loss(out.logits, ids, lengths), new, None, rollouts, advantages, cfg).loss.backward()
    detached = _grads(model)
    worst = max(float((detached[n] - reference[n]).norm() / reference[n].norm().clamp_min(1e-30))
                for n in reference if reference[n].norm() > 0)
    assert worst > 1e-3, "detaching the states should visibly change some parameter's gradient"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_snapshot_decode_matches_teacher_forcing(name):
    """Behaviour log-probs and rollout hidden states equal a full forward over prefix + rollout."""
    model = _model(name)
    ids, lengths, positions = _batch()
    cfg = RefineConfig(num_chunks=6, rollout_len=4, num_samples=2, temperature=0.8, top_p=0.95)
    rollouts = snapshot_rollouts(model, ids, lengths, cfg, torch.Generator().manual_seed(9), positions=positions)
    rows, starts = prefix_rows(positions)
    for i in range(rollouts.num_rollouts):
        row, start = int(rows[i // 2]), int(starts[i // 2])
        seq = torch.cat([ids[row, :start], rollouts.tokens[i]])[None]
        out = model(seq, output_state=False)
        logits = out.logits[0, start - 1:start + 3] / 0.8
        expected = torch.log_softmax(logits, -1).gather(-1, rollouts.tokens[i][:, None])[:, 0]
        torch.testing.assert_close(rollouts.logprobs[i].to(expected.dtype), expected, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(rollouts.hidden[i], out.hidden_states[0, start:start + 4], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(rollouts.target_tokens[i], ids[row, start:start + 4])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_step_samples_the_snapshot_engines_rollouts(name):
    """The fused step decodes k - 1 steps and takes the rollout hidden states from its teacher-forced
    forward; with the same seed and positions its rollouts equal the snapshot engine's."""
    model = _model(name)
    ids, lengths, positions = _batch()
    cfg = RefineConfig(num_chunks=6, rollout_len=4, num_samples=2, temperature=0.9)
    snap = snapshot_rollouts(model, ids, lengths, cfg, torch.Generator().manual_seed(4), positions=positions)
    _, fused = fused_refine_step(model, ids, lengths, cfg, torch.Generator().manual_seed(4), positions=positions)
    torch.testing.assert_close(fused.tokens, snap.tokens)
    for field in ("logprobs", "hidden", "target_hidden", "entropies"):
        torch.testing.assert_close(getattr(fused, field), getattr(snap, field), rtol=1e-6, atol=1e-9, msg=field)
    assert not fused.hidden.requires_grad


def test_reprefill_rollouts_equal_snapshot_rollouts():
    """The paper code's generation pattern and the snapshot engine sample the same rollouts."""
    from refine.algorithm.rollout import reprefill_rollouts

    model = _model("gated_deltanet")
    ids, lengths, positions = _batch()
    cfg = RefineConfig(num_chunks=6, rollout_len=4, num_samples=1, temperature=0.0)  # greedy: no RNG order issue
    snap = snapshot_rollouts(model, ids, lengths, cfg, positions=positions)
    # padded: every prefix padded to the batch width, the paper code's layout; padding never leaks.
    for padded in (False, True):
        ref = reprefill_rollouts(model, ids, lengths, cfg, positions, padded=padded)
        torch.testing.assert_close(ref.tokens, snap.tokens)
        assert ref.logprobs.dtype == snap.logprobs.dtype  # the model's float64, as decode scores its samples
        torch.testing.assert_close(ref.logprobs, snap.logprobs, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ref.hidden, snap.hidden, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ref.target_hidden, snap.target_hidden, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ref.entropies, snap.entropies, rtol=1e-6, atol=1e-9)
    # Both engines decode in inference mode but hand back tensors autograd may save (the learner
    # embeds the tokens).
    for rollouts in (snap, ref):
        assert not any(value.is_inference() for value in vars(rollouts).values() if isinstance(value, torch.Tensor))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_samples", [1, 3])
def test_paths_agree_on_cuda_and_equal_the_cpu(name, num_samples):
    """On CUDA in float64 (our torch kernels): the three paths agree, and equal the CPU on the same rollouts."""
    cpu_model = _model(name)
    model = _model(name).cuda()
    ids, lengths, positions = (t.cuda() for t in _batch())
    cfg = RefineConfig(num_chunks=6, rollout_len=5, num_samples=num_samples, lambda_nsp=0.7, temperature=1.0)

    model.zero_grad()
    fused, rollouts = fused_refine_step(model, ids, lengths, cfg, torch.Generator("cuda").manual_seed(5),
                                        positions=positions)
    fused.loss.backward()
    fused_grads = _grads(model)
    assert rollouts.tokens.is_cuda and rollouts.rewards.is_cuda
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)
    for mode in ("onepass", "reference"):
        model.zero_grad()
        result = refine_loss(mode, model, ids, lengths, rollouts, advantages, cfg)
        result.loss.backward()
        torch.testing.assert_close(result.loss, fused.loss, rtol=1e-6, atol=0, msg=mode)
        for pname, grad in _grads(model).items():
            torch.testing.assert_close(grad, fused_grads[pname], rtol=1e-6, atol=1e-12, msg=f"{mode}: {pname}")

    cpu_model.zero_grad()
    cpu = refine_loss("onepass", cpu_model, ids.cpu(), lengths.cpu(), rollouts.map(torch.Tensor.cpu),
                      advantages.cpu(), cfg)
    cpu.loss.backward()
    torch.testing.assert_close(cpu.loss, fused.loss.cpu(), rtol=1e-9, atol=0)
    for pname, grad in _grads(cpu_model).items():
        torch.testing.assert_close(grad, fused_grads[pname].cpu(), rtol=1e-7, atol=1e-12, msg=pname)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["delta_net", "gated_deltanet"])
def test_reference_path_through_fla_kernels_matches_onepass(name):
    """float32 on CUDA: re-prefilled prefixes run through fla's Triton kernels, the one-pass path through
    ours (states at positions); loss and gradients agree to the kernels' float32 accuracy. (Where fla
    refuses its gated backward, fla issue #640, the gated rule's gradient calls stay on our kernel.)"""
    from refine.kernels import dispatch

    if dispatch._fla_ops() is None:
        pytest.skip("flash-linear-attention with triton is not importable on this CUDA machine")
    model = _model(name).float().cuda()
    ids, lengths, positions = (t.cuda() for t in _batch())
    cfg = RefineConfig(num_chunks=6, rollout_len=5, num_samples=2, lambda_nsp=0.7, temperature=1.0)
    q = torch.zeros(1, 150, 2, 16, device="cuda")
    assert dispatch.select_kernel(q, None, None, needs_grad=True).startswith("fla")
    with torch.no_grad():
        _, rollouts = fused_refine_step(model, ids, lengths, cfg, torch.Generator("cuda").manual_seed(5),
                                        positions=positions)
    advantages = advantages_for(rollouts.rewards, rollouts, cfg)
    results = {}
    for mode in ("onepass", "reference"):
        model.zero_grad()
        result = refine_loss(mode, model, ids, lengths, rollouts, advantages, cfg)
        result.loss.backward()
        results[mode] = (result.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (loss, grad), (ref_loss, ref_grad) = results["onepass"], results["reference"]
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < 1e-2
