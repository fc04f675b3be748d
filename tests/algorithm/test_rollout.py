"""Snapshot decoding (refine.algorithm.rollout.decode): host reads and bad logits; a batch's rollouts by document;
the re-prefill baseline's padded layout and its document pass."""

import math

import pytest
import torch

from refine.algorithm.rollout import Rollouts, decode, reprefill_rollouts, snapshot_rollouts
from refine.config import RefineConfig
from refine.models import build_model

MODELS = {
    "delta_net": dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=40,
                      intermediate_size=48, use_short_conv=True),
    "gated_deltanet": dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16,
                           num_hidden_layers=2, vocab_size=40, intermediate_size=48),
}


def _prefix_states(name):
    torch.manual_seed(0)
    model = build_model(MODELS[name])
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_state=False, defer_states=True)
        positions = torch.tensor([[5, 17], [9, 30]])
        first_logits = out.logits[[0, 0, 1, 1], positions.flatten() - 1]
        return model, out.states_at(positions), first_logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decode_reads_the_device_once_per_batch(name, host_reads):
    """k tokens decode without a host read per step: the finiteness of every step's logits is read once."""
    model, states, first_logits = _prefix_states(name)
    cfg = RefineConfig(num_chunks=2, rollout_len=5, num_samples=3, temperature=0.9, top_p=0.9, top_k=10)
    reads, (tokens, logprobs, hidden) = host_reads(
        lambda: decode(model, states, first_logits, cfg, torch.Generator().manual_seed(2)))
    assert reads == 1
    assert tokens.shape == logprobs.shape == (12, 5) and hidden.shape == (12, 5, 32)
    assert ((tokens >= 0) & (tokens < 40)).all() and torch.isfinite(logprobs).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decode_rejects_logits_that_turn_non_finite_at_a_later_step(name):
    """The prefix predictions are finite; the states are not, so step 2's logits are NaN. The check,
    made once after the loop, still raises rather than handing back rollouts sampled from NaN."""
    model, states, first_logits = _prefix_states(name)
    states = states.map(lambda t: t * math.nan if t.is_floating_point() else t)
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=1)
    with pytest.raises(ValueError, match="logits must be finite"):
        decode(model, states, first_logits, cfg, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="logits must be finite"):
        decode(model, states, first_logits * math.inf, cfg, torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decode_never_samples_the_models_eos(name):
    """Rollouts are exactly k tokens, as the paper's code generates them (min_new_tokens = k): the model's
    EOS is never drawn, even where it is the likeliest token, and the behaviour log-probs stay those of
    the unmasked distribution."""
    model, states, first_logits = _prefix_states(name)
    favourite = int(first_logits[0].argmax())
    cfg = RefineConfig(num_chunks=2, rollout_len=4, num_samples=50)
    model.config.eos_token_id = None
    free, _, _ = decode(model, states, first_logits, cfg, torch.Generator().manual_seed(3))
    assert (free == favourite).any()

    model.config.eos_token_id = favourite
    tokens, logprobs, _ = decode(model, states, first_logits, cfg, torch.Generator().manual_seed(3))
    assert not (tokens == favourite).any()
    unmasked = torch.log_softmax(first_logits, -1).repeat_interleave(50, 0)
    torch.testing.assert_close(logprobs[:, 0], unmasked.gather(-1, tokens[:, :1])[:, 0])
    greedy, _, _ = decode(model, states, first_logits, cfg.model_copy(update={"temperature": 0.0}), None)
    assert greedy[0, 0] != favourite and not (greedy == favourite).any()

    model.config.eos_token_id = 40
    with pytest.raises(ValueError, match="eos_token_id=40 is outside the vocabulary"):
        decode(model, states, first_logits, cfg, None)


def test_documents_of_a_batch_keep_their_rollouts() -> None:
    batch, chunks, samples, k = 3, 2, 2, 4
    n = batch * chunks * samples
    rollouts = Rollouts(positions=torch.arange(batch * chunks).reshape(batch, chunks),
                        tokens=torch.arange(n)[:, None].expand(n, k), logprobs=torch.zeros(n, k),
                        hidden=torch.zeros(n, k, 0), target_tokens=torch.zeros(n, k, dtype=torch.long),
                        target_hidden=torch.zeros(n, k, 0), entropies=torch.zeros(batch, chunks),
                        num_samples=samples, rewards=torch.arange(n, dtype=torch.float32))
    part = rollouts.documents(1, 3)  # rollout i belongs to document i // (chunks * samples)
    assert part.positions.tolist() == [[2, 3], [4, 5]]
    assert part.tokens[:, 0].tolist() == list(range(4, 12))
    assert part.rewards.tolist() == [float(i) for i in range(4, 12)]
    assert part.num_samples == samples and part.entropies.shape == (2, chunks)


def _reprefill_batch():
    torch.manual_seed(0)
    model = build_model(MODELS["delta_net"], dtype=torch.float64)
    ids = torch.randint(0, 40, (2, 40), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([40, 31])
    positions = torch.tensor([[3, 20], [9, 26]])
    return model, ids, lengths, positions


def _tokens_through(model, run) -> dict[str, int]:
    """Tokens (rows x width) the first block's mixer and MLP see while `run()` runs."""
    seen = {"mixer": 0, "mlp": 0}
    block = model.model.layers[0]

    def counter(name):
        def hook(module, args, output):
            seen[name] += args[0].shape[0] * args[0].shape[1]
        return hook

    hooks = [block.attn.register_forward_hook(counter("mixer")), block.mlp.register_forward_hook(counter("mlp"))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_padded_reprefill_runs_the_mixers_over_the_real_tokens_only() -> None:
    """The paper's layout pads every prefix to the batch width, but fla's DeltaNet layer unpads by the
    attention mask: only embeddings, norms, MLPs and lm_head see the padding. The rollouts are those
    of the unpadded layout."""
    model, ids, lengths, positions = _reprefill_batch()
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=2, temperature=0.8)
    results = {}

    def run(padded):
        results[padded] = reprefill_rollouts(model, ids, lengths, cfg, positions, torch.Generator().manual_seed(1),
                                             padded=padded)

    plain = _tokens_through(model, lambda: run(False))
    padded = _tokens_through(model, lambda: run(True))
    assert padded["mixer"] == plain["mixer"]
    # Each prefix's prefill and prefix + rollout forward carry (width - prefix) pad tokens per sample.
    padding = sum(2 * cfg.num_samples * (ids.shape[1] - p) for p in positions.flatten().tolist())
    assert padded["mlp"] == plain["mlp"] + padding
    torch.testing.assert_close(results[True].tokens, results[False].tokens, rtol=0, atol=0)
    for field in ("logprobs", "hidden", "target_hidden", "entropies"):
        torch.testing.assert_close(getattr(results[True], field), getattr(results[False], field), rtol=0, atol=0,
                                   msg=field)


def test_reprefill_takes_the_ground_truth_from_the_callers_document_pass() -> None:
    """Given the hidden states of the pass that chose the positions, re-prefill runs no second document
    forward, and its rollouts are bit-identical."""
    model, ids, lengths, positions = _reprefill_batch()
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=2, temperature=0.8)
    with torch.inference_mode():
        document = model(ids, lengths=lengths, output_state=False)
    widths = []
    hook = model.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    given = reprefill_rollouts(model, ids, lengths, cfg, positions, torch.Generator().manual_seed(1),
                               document_hidden=document.hidden_states)
    hook.remove()
    assert ids.shape[1] not in widths  # no full-document forward of its own
    own = reprefill_rollouts(model, ids, lengths, cfg, positions, torch.Generator().manual_seed(1))
    for field in ("tokens", "logprobs", "hidden", "target_tokens", "target_hidden", "entropies"):
        assert torch.equal(getattr(given, field), getattr(own, field)), field


@pytest.mark.parametrize("rollouts", [snapshot_rollouts, reprefill_rollouts])
def test_the_ground_truth_is_the_k_tokens_from_each_position_and_their_hidden_states(rollouts) -> None:
    """A rollout from position p continues the prefix ids[:p]: its rewards compare it with ids[p : p + k] and
    the full forward's final-layer hidden states there, each repeated for the n samples."""
    model, ids, lengths, positions = _reprefill_batch()
    cfg = RefineConfig(num_chunks=2, rollout_len=3, num_samples=2, temperature=0.8)
    with torch.no_grad():
        hidden = model(ids, lengths=lengths, output_state=False).hidden_states
    out = rollouts(model, ids, lengths, cfg, positions=positions, generator=torch.Generator().manual_seed(1))
    for i, (b, p) in enumerate((b, p) for b in range(2) for p in positions[b].tolist()):
        for sample in range(cfg.num_samples):
            row = i * cfg.num_samples + sample
            assert torch.equal(out.target_tokens[row], ids[b, p:p + 3]), (b, p)
            torch.testing.assert_close(out.target_hidden[row], hidden[b, p:p + 3], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rollouts", [snapshot_rollouts, reprefill_rollouts])
@pytest.mark.parametrize("bad, named", [([[0, 20], [9, 26]], r"positions\[0, 0\]=0 is outside 1\.\.37 "
                                                               r"\(document length 40, rollout_len k=3\)"),
                                        ([[3, 20], [9, 29]], r"positions\[1, 1\]=29 is outside 1\.\.28 "
                                                             r"\(document length 31, rollout_len k=3\)")])
def test_given_positions_a_rollout_cannot_start_at_are_refused_naming_the_entry(rollouts, bad, named) -> None:
    # Position 0 has no prefix (its first logits would wrap to the row's end); past length - k the ground
    # truth would read padding.
    model, ids, lengths, positions = _reprefill_batch()
    cfg = RefineConfig(num_chunks=2, rollout_len=3, margin=4, num_samples=2)
    with pytest.raises(ValueError, match=named):
        rollouts(model, ids, lengths, cfg, positions=torch.tensor(bad))
    edges = torch.tensor([[1, 37], [1, 28]])  # the first and last allowed
    assert rollouts(model, ids, lengths, cfg, positions=edges).tokens.shape == (8, 3)


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-3)], ids=["top_k", "top_p"])
def test_rollouts_are_sampled_under_the_configs_top_k_and_top_p(filters):
    """decode passes refine.top_k and refine.top_p to the sampler: with only the likeliest token left, every one of
    n = 4 samples at temperature 1 is the greedy rollout (the log-probs, unfiltered by design, cannot show it)."""
    torch.manual_seed(0)
    model = build_model(MODELS["delta_net"])
    ids = torch.randint(0, 40, (1, 40), generator=torch.Generator().manual_seed(1))
    lengths, positions = torch.tensor([40]), torch.tensor([[8, 25]])
    greedy = snapshot_rollouts(model, ids, lengths, RefineConfig(num_chunks=2, rollout_len=4, margin=2,
                                                                 temperature=0), positions=positions)
    cfg = RefineConfig(num_chunks=2, rollout_len=4, margin=2, num_samples=4, temperature=1.0, group_by="document",
                       **filters)  # per-position groups of one repeated rollout are refused
    sampled = snapshot_rollouts(model, ids, lengths, cfg, torch.Generator().manual_seed(3), positions=positions)
    assert torch.equal(sampled.tokens, greedy.tokens.repeat_interleave(4, dim=0))
    unfiltered = RefineConfig(num_chunks=2, rollout_len=4, margin=2, num_samples=4, temperature=1.0)
    free = snapshot_rollouts(model, ids, lengths, unfiltered, torch.Generator().manual_seed(3), positions=positions)
    assert not torch.equal(free.tokens, sampled.tokens)  # without the filter the same seed draws otherwise
