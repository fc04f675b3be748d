"""LaCT: the release's algorithm, and the model contract (carried state, position states, padding,
decoding) in float64 on tiny configs; float32 where the release's bfloat16 Muon iterations matter."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from refine.models import ModelState
from refine.models.lact import LaCTConfig, LaCTForCausalLM
from refine.models.lact_ops import newton_schulz5

CONFIGS = {
    # momentum + Muon, low-rank initial weights, rotary on the fast weights, d_h != d_in
    "momentum_muon": dict(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attn_heads=4, num_lact_heads=2,
        inter_multi=2, lact_chunk_size=4, window_size=3, intermediate_size=24, w0_w2_low_rank=3,
        use_momentum=True, use_muon=True,
    ),
    # pre-norm updates, per-channel learning rates, full-rank weights, no rotary on the fast weights
    "prenorm_per_channel": dict(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attn_heads=2, num_lact_heads=2,
        lact_chunk_size=3, window_size=5, intermediate_size=24, lr_dim=8, use_momentum=False,
        ttt_prenorm=True, ttt_nope=True, attn_qk_norm=True, qkv_bias=True, no_v_silu=True,
        learnable_ttt_scale=False, rope_theta=500.0,
    ),
}


def make_model(name: str, **overrides) -> LaCTForCausalLM:
    torch.manual_seed(0)
    model = LaCTForCausalLM(LaCTConfig(**{**CONFIGS[name], **overrides})).double()
    # Larger random weights so that every path (and the test-time updates) visibly matters.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("lr_proj.bias"):
                p.uniform_(6.5, 7.5)  # softplus(bias - 6.9): per-token learning rates near 0.7
            elif pname.endswith(("norm.weight", "qk_scale")):
                p.uniform_(0.5, 1.5)
            elif pname.endswith(("qk_offset", ".bias")):
                p.normal_(0.0, 0.1)
            elif p.dim() == 2 and "embeddings" not in pname:
                p.normal_(0.0, 0.3)
            elif "embeddings" in pname:
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    return make_model(request.param)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(actual: dict, expected: dict, rel: float = 1e-9):
    """Max abs difference relative to the gradient's scale (Muon's iterations amplify rounding)."""
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        scale = max(1.0, grad.abs().max().item())
        error = (actual[name] - grad).abs().max().item()
        assert error <= rel * scale, f"{name}: max error {error:.3e} at scale {scale:.3e}"


def _assert_states_close(actual: ModelState, expected: ModelState, **tol):
    assert len(actual.layers) == len(expected.layers)
    for layer_a, layer_e in zip(actual.layers, expected.layers):
        assert set(layer_a) == set(layer_e)
        for name in layer_e:
            if name == "tokens_seen":
                assert torch.equal(layer_a[name], layer_e[name]), name
            else:
                torch.testing.assert_close(layer_a[name], layer_e[name], msg=name, **tol)


# ---- an independent transcription of the release's full-sequence forward -----------------------

def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, theta):  # x [B, T, H, d], positions 0..T-1, rotate halves
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos()[None, :, None].to(x.dtype), ang.sin()[None, :, None].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _zeropower(g, work_dtype=None):
    # The release iterates in bfloat16 (`X = G.bfloat16()`) and returns bfloat16, which `w + dw` then
    # promotes to float32. float64 stays float64: our exactness extension, not the release's.
    if work_dtype is None:
        work_dtype = torch.float64 if g.dtype == torch.float64 else torch.bfloat16
    x = g.to(work_dtype)
    x = x.transpose(1, 2) if g.size(1) > g.size(2) else x
    x = x / (x.norm(dim=(1, 2), keepdim=True) + 1e-7)
    for a, b, c in [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                    (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]:
        m = x @ x.transpose(1, 2)
        x = a * x + (b * m + c * m @ m) @ x
    return x.transpose(1, 2) if g.size(1) > g.size(2) else x


def _release_ttt(w0, w1, w2, q, k, v, lr0, lr1, lr2, chunk, muon, momentum, prenorm):
    """Block-causal apply-then-update, in the release's [b*nh, ...] layout and loop structure."""
    n0, n1, n2 = (w.norm(dim=2, keepdim=True) for w in (w0, w1, w2))
    m0, m1, m2 = (torch.zeros_like(w) for w in (w0, w1, w2))
    main = [w0, w1, w2]
    q, v = q.transpose(1, 2), v.transpose(1, 2)
    out = torch.zeros_like(v)
    end, T = 0, k.shape[1]
    for s in range(0, T - chunk, chunk):
        end = s + chunk
        ki, vi, qi = k[:, s:end], v[:, :, s:end], q[:, :, s:end]
        out[:, :, s:end] = w1 @ (F.silu(w0 @ qi) * (w2 @ qi))
        gb = w0 @ ki.transpose(1, 2)
        hb = w2 @ ki.transpose(1, 2)
        hidden = F.silu(gb) * hb
        dh = w1.transpose(1, 2) @ vi
        dhb = dh * F.silu(gb)
        sig = torch.sigmoid(gb)
        dgb = dh * hb * sig * (1 + gb * (1 - sig))
        dw1 = vi @ (hidden.transpose(1, 2) * lr1[:, s:end])
        dw0 = dgb @ (ki * lr0[:, s:end])
        dw2 = dhb @ (ki * lr2[:, s:end])
        if momentum is not None:
            mi = momentum[:, s:end].mean(dim=1, keepdim=True)
            dw0, dw1, dw2 = dw0 + m0 * mi, dw1 + m1 * mi, dw2 + m2 * mi
            m0, m1, m2 = dw0, dw1, dw2
        if muon:
            dw0, dw1, dw2 = _zeropower(dw0), _zeropower(dw1), _zeropower(dw2)
        if prenorm:
            main = [main[0] + dw0, main[1] + dw1, main[2] + dw2]
            src = main
        else:
            src = [w0 + dw0, w1 + dw1, w2 + dw2]
        w0 = src[0] / (src[0].norm(dim=2, keepdim=True) + 1e-5) * n0
        w1 = src[1] / (src[1].norm(dim=2, keepdim=True) + 1e-5) * n1
        w2 = src[2] / (src[2].norm(dim=2, keepdim=True) + 1e-5) * n2
    qi = q[:, :, end:]
    out[:, :, end:] = w1 @ (F.silu(w0 @ qi) * (w2 @ qi))
    return out.transpose(1, 2)


def _release_layer(layer, cfg, x):
    B, T, D = x.shape
    H, hd, nh = cfg.num_attn_heads, D // cfg.num_attn_heads, cfg.num_lact_heads
    q, k, v = layer.qkv(x).chunk(3, -1)
    if cfg.attn_qk_norm:
        q, k = _rms(q, layer.q_norm.weight, 1e-5), _rms(k, layer.k_norm.weight, 1e-5)
    fq = q * layer.qk_scale[:, 0] + layer.qk_offset[:, 0]
    fk = k * layer.qk_scale[:, 1] + layer.qk_offset[:, 1]
    fv = v
    qh, kh = _rope(q.view(B, T, H, hd), cfg.rope_theta), _rope(k.view(B, T, H, hd), cfg.rope_theta)
    scores = torch.einsum("bthd,bshd->bhts", qh, kh) / math.sqrt(hd)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (s <= t) & (s > t - cfg.window_size)
    att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = torch.einsum("bhts,bshd->bthd", att, v.view(B, T, H, hd)).reshape(B, T, D)

    def heads(z):  # "b s (n_h d) -> (b n_h) s d"
        return z.view(B, T, nh, -1).transpose(1, 2).reshape(B * nh, T, -1)

    def unheads(z):
        return z.view(B, nh, T, -1).transpose(1, 2).reshape(B, T, -1)

    fq, fk, fv = heads(fq), heads(fk), heads(fv)
    if cfg.qkv_silu:
        fq, fk = F.silu(fq), F.silu(fk)
        if not cfg.no_v_silu:
            fv = F.silu(fv)
    fq = fq / (fq.norm(dim=-1, keepdim=True) + 1e-5)
    fk = fk / (fk.norm(dim=-1, keepdim=True) + 1e-5)
    if not cfg.ttt_nope:
        fq = heads(_rope(unheads(fq).view(B, T, H, hd), cfg.rope_theta).reshape(B, T, D))
        fk = heads(_rope(unheads(fk).view(B, T, H, hd), cfg.rope_theta).reshape(B, T, D))

    def initial(w):
        if isinstance(w, torch.nn.Parameter):
            return w
        return w.w_left @ w.w_right + 0.5 * torch.eye(w.w_left.shape[1], w.w_right.shape[2], dtype=x.dtype)

    w0, w1, w2 = (initial(w).repeat(B, 1, 1) for w in (layer.w0, layer.w1, layer.w2))
    base_lr_inv = 0.001 + math.log(-math.expm1(-0.001))
    lr = heads(F.softplus(layer.lr_proj(x) + base_lr_inv))
    lr0, lr1, lr2 = lr.chunk(3, -1)
    momentum = heads(torch.sigmoid(layer.momentum_proj[0](x))) if cfg.use_momentum else None
    fw = _release_ttt(w0, w1, w2, fq, fk, fv, lr0, lr1, lr2, cfg.lact_chunk_size, cfg.use_muon, momentum,
                      cfg.ttt_prenorm)
    fw = _rms(fw, layer.ttt_norm.weight, 1e-5)
    if cfg.learnable_ttt_scale:
        fw = fw * heads(F.silu(layer.ttt_scale_proj(x)))
    return layer.o_proj(o + unheads(fw))


def _release_logits(model, ids):
    cfg = model.config
    x = model.model.embeddings(ids)
    for block in model.model.layers:
        x = x + _release_layer(block.attn, cfg, _rms(x, block.attn_norm.weight, cfg.norm_eps))
        h = _rms(x, block.mlp_norm.weight, cfg.norm_eps)
        x = x + block.mlp.down_proj(F.silu(block.mlp.gate_proj(h)) * block.mlp.up_proj(h))
    return model.lm_head(_rms(x, model.model.norm.weight, cfg.norm_eps))


def test_forward_matches_release_algorithm(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    expected = _release_logits(model, ids)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-10, atol=1e-10)
    # The fast weights change the output: zeroing the learning rates must change the logits.
    with torch.no_grad():
        for block in model.model.layers:
            block.attn.lr_proj.bias.fill_(-60.0)
    assert (model(ids).logits - expected).abs().max() > 1e-3


def test_muon_iterates_in_bfloat16_like_the_release_except_in_float64():
    gen = torch.Generator().manual_seed(11)
    for shape in [(2, 3, 16, 8), (2, 3, 8, 16), (1, 2, 12, 12)]:  # tall (iterated transposed), wide, square
        g = torch.randn(shape, generator=gen)
        release = _zeropower(g.flatten(0, 1)).view(shape)
        assert release.dtype == torch.bfloat16
        ours = newton_schulz5(g)
        assert ours.dtype == torch.float32 and torch.equal(ours, release.float())
        exact = newton_schulz5(g.double())
        assert exact.dtype == torch.float64
        torch.testing.assert_close(exact, _zeropower(g.double().flatten(0, 1)).view(shape), rtol=1e-12, atol=1e-12)
        # bfloat16 iterations are not float32 ones plus noise: the update moves by about 2%
        assert (ours.double() - exact).norm() > 0.01 * exact.norm()


def test_float32_model_matches_release_with_bfloat16_muon(monkeypatch):
    model = make_model("momentum_muon").float()
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
        expected = _release_logits(model, ids)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        # The check has teeth: float32 iterations land far outside the tolerance.
        monkeypatch.setitem(globals(), "_zeropower", functools.partial(_zeropower, work_dtype=torch.float32))
        float32_iterations = _release_logits(model, ids)
    assert (float32_iterations - expected).abs().max() > 0.1


# ---- the model contract -------------------------------------------------------------------------

def test_segments_equal_whole_sequence(model):
    gen = torch.Generator().manual_seed(1)
    T = 29
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=gen)
    weights = torch.randn(2, T, model.config.vocab_size, generator=gen, dtype=torch.float64)
    hidden_weights = torch.randn(2, T, model.config.hidden_size, generator=gen, dtype=torch.float64)

    def loss(out):
        return (out.logits * weights).sum() + (out.hidden_states * hidden_weights).sum()

    model.zero_grad()
    whole = model(ids)
    loss(whole).backward()
    whole_grads = _grads(model)
    chunk = model.config.lact_chunk_size
    random_cuts = torch.randperm(T - 1, generator=gen)[:4].add(1).tolist()
    # inside chunks, on chunk boundaries, and runs of segments shorter than the window
    for cuts in (random_cuts + [chunk, 3 * chunk], [1, 2, 3, chunk + 1, chunk + 2, 4 * chunk, 4 * chunk + 1]):
        bounds = [0] + sorted(set(cuts)) + [T]
        model.zero_grad()
        state, logits, hidden = None, [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            out = model(ids[:, a:b], state=state)
            state = out.state
            logits.append(out.logits)
            hidden.append(out.hidden_states)
        joined = type(whole)(logits=torch.cat(logits, 1), hidden_states=torch.cat(hidden, 1))
        loss(joined).backward()
        torch.testing.assert_close(joined.logits, whole.logits, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(joined.hidden_states, whole.hidden_states, rtol=1e-9, atol=1e-10)
        _assert_states_close(state, whole.state, rtol=1e-8, atol=1e-10)
        _assert_grads_close(_grads(model), whole_grads)


def test_position_states_equal_prefix_runs(model):
    gen = torch.Generator().manual_seed(4)
    T = 23
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=gen)
    chunk = model.config.lact_chunk_size
    # different positions per row: start, inside chunks, on a chunk boundary, the end
    positions = torch.tensor([[0, 5, 2 * chunk, T], [1, chunk, 13, 22]])
    out = model(ids, state_positions=positions)
    P = positions.shape[1]
    weights = [{n: torch.randn(t.shape[1:], generator=gen, dtype=torch.float64) for n, t in layer.items()
                if t.is_floating_point()} for layer in out.position_states.layers]

    def state_loss(state, row):
        return sum((layer[n][row] * w).sum() for layer, ws in zip(state.layers, weights) for n, w in ws.items())

    model.zero_grad()
    sum(state_loss(out.position_states, i) for i in range(2 * P)).backward()
    position_grads = _grads(model)

    model.zero_grad()
    for b in range(2):
        for j, p in enumerate(positions[b].tolist()):
            prefix = model(ids[b:b + 1, :p])
            _assert_states_close(out.position_states.index([b * P + j]), prefix.state, rtol=1e-9, atol=1e-11)
            state_loss(prefix.state, 0).backward()
            # continuing from the position state reproduces the whole pass's logits after p
            if p < T:
                cont = model(ids[b:b + 1, p:], state=out.position_states.index([b * P + j]).detach())
                torch.testing.assert_close(cont.logits[0], out.logits[b, p:], rtol=1e-9, atol=1e-10)
    _assert_grads_close(position_grads, _grads(model))


def test_deferred_states_match_requested(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[3, 17], [8, 12]])
    eager = model(ids, state_positions=positions)
    deferred = model(ids, defer_states=True)
    _assert_states_close(deferred.states_at(positions), eager.position_states, rtol=0, atol=0)
    _assert_states_close(deferred.states_at(torch.tensor([[17], [17]])), eager.state, rtol=0, atol=0)
    stateless = model(ids, output_state=False)
    assert stateless.state is None
    torch.testing.assert_close(stateless.logits, eager.logits, rtol=0, atol=0)


def test_padded_batch_matches_rows_alone(model):
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([21, 9, 1, 12])
    ids = torch.randint(0, model.config.vocab_size, (4, 21), generator=gen)
    batch = model(ids, lengths=lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = model(ids[row:row + 1, :length])
        torch.testing.assert_close(batch.logits[row, :length], alone.logits[0], rtol=1e-10, atol=1e-12)
        _assert_states_close(batch.state.index([row]), alone.state, rtol=1e-10, atol=1e-12)
    # continuing the whole padded batch (rows at different chunk phases) equals each row alone,
    # and so do the gradients that flow back through the carried state
    nxt = torch.randint(0, model.config.vocab_size, (4, 7), generator=gen)
    weights = torch.randn(4, 7, model.config.vocab_size, generator=gen, dtype=torch.float64)
    model.zero_grad()
    cont = model(nxt, state=batch.state)
    (cont.logits * weights).sum().backward()
    batch_grads = _grads(model)
    model.zero_grad()
    for row, length in enumerate(lengths.tolist()):
        alone = model(torch.cat([ids[row:row + 1, :length], nxt[row:row + 1]], 1))
        torch.testing.assert_close(cont.logits[row], alone.logits[0, length:], rtol=1e-9, atol=1e-11)
        (alone.logits[0, length:] * weights[row]).sum().backward()
    _assert_grads_close(batch_grads, _grads(model))


def test_a_batch_of_no_rows_gives_no_logits_and_no_gradient(model):
    # A data-parallel rank past the batch's documents, or an empty slice, runs the model on zero rows
    # (the delta models already did: tests/models/test_carried_state.py).
    out = model(torch.zeros(0, 12, dtype=torch.long))
    assert out.logits.shape == (0, 12, model.config.vocab_size)
    out.logits.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_state_expand_index_detach(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(6))
    state = model(ids).state
    assert state.batch_size == 2
    expanded = state.expand(3)
    assert expanded.batch_size == 6
    for layer, big in zip(state.layers, expanded.layers):
        for name, tensor in layer.items():
            assert torch.equal(big[name][4], tensor[1]) and torch.equal(big[name][2], tensor[0]), name
    picked = expanded.index([2, 5])
    _assert_states_close(picked, state, rtol=0, atol=0)
    detached = state.detach()
    assert all(not t.requires_grad for layer in detached.layers for t in layer.values())
    assert any(t.requires_grad for layer in state.layers for t in layer.values())
    # expanded states decode identically per copy
    nxt = torch.randint(0, model.config.vocab_size, (6, 3), generator=torch.Generator().manual_seed(7))
    nxt[3:] = nxt[:3]
    with torch.no_grad():
        out = model(nxt, state=ModelState.cat([state.index([0]).expand(3), state.index([0]).expand(3)]))
    torch.testing.assert_close(out.logits[:3], out.logits[3:], rtol=1e-12, atol=1e-13)


def test_step_by_step_decoding_equals_whole(model):
    gen = torch.Generator().manual_seed(8)
    T = 3 * model.config.lact_chunk_size + 5
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=gen)
    with torch.no_grad():
        whole = model(ids)
        # rows start at different chunk phases: a padded prefix pass, then T=1 steps
        lengths = torch.tensor([2, 5])
        prefix = model(ids[:, :5], lengths=lengths)
        state = prefix.state
        steps = {0: [prefix.logits[0, :2]], 1: [prefix.logits[1, :5]]}
        for t in range(T - 5):
            step_ids = torch.stack([ids[0, 2 + t], ids[1, 5 + t]])[:, None]
            out = model(step_ids, state=state)
            state = out.state
            steps[0].append(out.logits[0])
            steps[1].append(out.logits[1])
    torch.testing.assert_close(torch.cat(steps[1]), whole.logits[1], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.cat(steps[0]), whole.logits[0, :T - 3], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_decoding_equals_whole_without_muon(name):
    """float32 decoding tracks the full pass to rounding. With Muon it only does so up to the noise of the
    release's bfloat16 iterations (see newton_schulz_dtype), so Muon is switched off here; float64 (the
    tests above) covers Muon exactly."""
    model = make_model(name, use_muon=False).float()
    T = 3 * model.config.lact_chunk_size + 5
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        whole = model(ids)
        state, steps = None, []
        for t in range(T):
            out = model(ids[:, t:t + 1], state=state)
            state = out.state
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole.logits, rtol=1e-5, atol=1e-5)


def test_a_decoding_step_reads_the_device_once_per_layer(model, host_reads):
    """A one-token step knows it spans one chunk step without reading the rows' chunk phases; the one
    read left per layer asks whether a row completes its chunk, which decides whether the fast-weight
    update (Muon's iterations included) runs at all."""
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        state = model(ids[:, :5], lengths=torch.tensor([2, 5])).state
        reads, out = host_reads(lambda: model(ids[:, 5:], state=state))
    assert reads == model.config.num_hidden_layers
    assert out.state.batch_size == 2


def test_state_dict_names_match_release():
    cfg = LaCTConfig(**CONFIGS["momentum_muon"])
    model = LaCTForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, nh, fw, dh, rank = 16, 2, 8, 16, 3
    expected_layer = {
        "attn_norm.weight": (d,), "mlp_norm.weight": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.o_proj.weight": (d, d),
        "attn.w0.w_left": (nh, dh, rank), "attn.w0.w_right": (nh, rank, fw),
        "attn.w2.w_left": (nh, dh, rank), "attn.w2.w_right": (nh, rank, fw),
        "attn.w1": (nh, fw, dh),
        "attn.lr_proj.weight": (3 * nh, d), "attn.lr_proj.bias": (3 * nh,),
        "attn.qk_scale": (d, 2), "attn.qk_offset": (d, 2),
        "attn.ttt_scale_proj.weight": (nh, d), "attn.ttt_scale_proj.bias": (nh,),
        "attn.ttt_norm.weight": (fw,),
        "attn.momentum_proj.0.weight": (nh, d), "attn.momentum_proj.0.bias": (nh,),
        "mlp.gate_proj.weight": (24, d), "mlp.up_proj.weight": (24, d), "mlp.down_proj.weight": (d, 24),
    }
    expected = {"model.embeddings.weight": (40, d), "model.norm.weight": (d,), "lm_head.weight": (40, d)}
    for i in range(2):
        expected.update({f"model.layers.{i}.{k}": v for k, v in expected_layer.items()})
    assert shapes == expected

    full = LaCTForCausalLM(LaCTConfig(**CONFIGS["prenorm_per_channel"]))
    names = set(full.state_dict())
    assert {"model.layers.0.attn.w0", "model.layers.0.attn.w2", "model.layers.0.attn.q_norm.weight",
            "model.layers.0.attn.k_norm.weight", "model.layers.0.attn.qkv.bias"} <= names
    assert full.state_dict()["model.layers.0.attn.lr_proj.weight"].shape == (8 * 3 * 2, 16)
    assert not any("momentum_proj" in n or "ttt_scale_proj" in n for n in names)


def test_release_config_round_trip():
    release = {  # the release's 760M config.json
        "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2, "fuse_cross_entropy": True,
        "fuse_norm": True, "hidden_act": "swish", "hidden_size": 1536, "num_attn_heads": 24,
        "num_hidden_layers": 24, "initializer_range": 0.02, "max_position_embeddings": 32768,
        "model_type": "lact_swiglu", "num_lact_heads": 4, "inter_multi": 1, "qkv_bias": False,
        "attn_qk_norm": False, "qkv_silu": True, "lact_chunk_size": 2048, "window_size": 2048,
        "use_muon": False, "lr_dim": 1, "lr_parameterization": "mamba", "learnable_ttt_scale": True,
        "w0_w2_low_rank": 32, "fw_init_gain": 0.5, "use_momentum": True, "rope_theta": 1000000,
        "norm_eps": 1e-06, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 32000,
    }
    cfg = LaCTConfig.model_validate(release)
    dumped = cfg.to_json_dict()
    assert "num_heads" not in dumped
    for key, value in release.items():
        assert dumped[key] == value, key
    assert cfg.num_heads == 24 and LaCTConfig().initializer_range == 0.006


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=16, num_attn_heads=3), "num_attn_heads"),
    (dict(hidden_size=16, num_attn_heads=16), "num_attn_heads"),  # odd rotary head size 1
    (dict(hidden_size=16, num_attn_heads=2, num_lact_heads=3), "num_lact_heads"),
    (dict(hidden_size=16, num_attn_heads=2, num_lact_heads=2, lr_dim=3), "lr_dim"),
    (dict(window_size=None), "window_size"),
    (dict(window_size=0), "window_size"),
    (dict(lact_chunk_size=0), "lact_chunk_size"),
    (dict(lr_parameterization="linear"), "lr_parameterization"),
    (dict(ttt_loss_type="l2"), "ttt_loss_type"),
    (dict(model_type="delta_net"), "model_type"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValidationError, match=field):
        LaCTConfig(**changes)


def test_num_heads_names_the_attention_heads_and_may_not_contradict_them():
    from refine.models import config_from_dict

    base = dict(model_type="lact_swiglu", hidden_size=32, num_lact_heads=2)
    assert config_from_dict({**base, "num_heads": 4}).num_attn_heads == 4
    assert config_from_dict({**base, "num_attn_heads": 4}).num_heads == 4
    with pytest.raises(ValueError, match=r"num_heads=4 and num_attn_heads=2 differ"):
        config_from_dict({**base, "num_heads": 4, "num_attn_heads": 2})


def test_the_release_fused_kernel_with_muon_is_refused_as_another_function():
    from refine.models import config_from_dict

    base = dict(model_type="lact_swiglu", hidden_size=32, num_lact_heads=2, num_heads=2, use_fused_kernel=True)
    with pytest.raises(ValueError, match=r"use_fused_kernel=true with use_muon=true is the release's fused kernel"):
        config_from_dict({**base, "use_muon": True})
    assert config_from_dict({**base, "use_muon": False}).use_fused_kernel  # the same function: kept, round-trips
