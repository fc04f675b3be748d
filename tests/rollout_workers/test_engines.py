"""Rollout engines: per-batch generators, the engine registry, and the snapshot engine's rollouts as a
function of (weights, documents, generator seed)."""

import pytest
import torch

from rollout_helpers import moved_weights, orchestrator_batches
from refine.algorithm.rollout import batch_generator
from rollout_workers.engines import ENGINES, SnapshotEngine, build_engine, engine_owner


def draws(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(8, generator=generator)


def test_batch_generator_is_deterministic_in_seed_epoch_and_offset() -> None:
    """The same (seed, epoch, offset) gives the same draws; changing any one of them changes them."""
    reference = draws(batch_generator(0, 1, 64))
    assert torch.equal(draws(batch_generator(0, 1, 64)), reference)
    others = [draws(batch_generator(1, 1, 64)), draws(batch_generator(0, 2, 64)), draws(batch_generator(0, 1, 66)),
              draws(batch_generator(0, 64, 1))]  # epoch and offset are not interchangeable
    for other in others:
        assert not torch.equal(other, reference)
    assert len({tuple(d.tolist()) for d in others}) == len(others)


def test_build_engine_refuses_an_unknown_engine_naming_the_available_ones(tiny_config) -> None:
    """An unknown engine name is an error naming it and every engine there is."""
    config = tiny_config()
    available = r"\(available: \['snapshot', 'vllm'\]\)"
    with pytest.raises(ValueError, match=rf"rollout engine 'sglang' is not available {available}"):
        build_engine(config, "sglang")
    assert sorted(ENGINES) == ["snapshot", "vllm"]


def test_build_engine_defaults_to_the_configured_engine(tiny_config) -> None:
    """Without a name, rollout.engine picks the engine (snapshot in the tiny config)."""
    config = tiny_config()
    assert config.rollout.engine == "snapshot"
    engine = build_engine(config, owner=engine_owner("run-a", "worker-0"))
    assert isinstance(engine, SnapshotEngine)
    assert engine.weight_version is None
    assert not any(p.requires_grad for p in engine.model.parameters())
    assert not engine.model.training


def test_engine_owner_tells_runs_and_workers_apart() -> None:
    """One owner per (run namespace, worker): the same worker id in another run is another owner."""
    assert engine_owner("run-a", "worker-0") == "run-a-worker-0"
    owners = {engine_owner(ns, worker) for ns in ("run-a", "run-b") for worker in ("worker-0", "worker-1")}
    assert len(owners) == 4


def test_snapshot_rollouts_are_a_function_of_weights_documents_and_seed(tiny_config) -> None:
    """Two engines built differently but given the same weights sample identical rollouts from the same
    generator seed; another seed samples other tokens. Rollouts have B * c * n rows of k tokens."""
    config = tiny_config()
    batch = orchestrator_batches(config, 1)[0]
    first = SnapshotEngine(config)
    second = SnapshotEngine(tiny_config("train.seed=1"))  # other initial weights until loaded
    weights = moved_weights(first.model.state_dict(), seed=7)
    assert any(not torch.equal(weights[name], value) for name, value in second.model.state_dict().items())
    first.load_weights(weights, 5)
    second.load_weights(weights, 5)
    assert first.weight_version == second.weight_version == 5

    seed = (config.train.seed, batch.cursor.epoch, batch.cursor.offset)
    a = first.rollout(batch.token_ids, batch.lengths, batch_generator(*seed))
    b = second.rollout(batch.token_ids, batch.lengths, batch_generator(*seed))
    for field in ("positions", "tokens", "logprobs", "hidden", "target_tokens", "target_hidden", "entropies"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field

    refine = config.refine
    rows = batch.batch_size * refine.num_chunks * refine.num_samples
    assert a.num_rollouts == rows == 16 and a.rollout_len == refine.rollout_len
    assert a.tokens.shape == a.logprobs.shape == a.target_tokens.shape == (rows, refine.rollout_len)
    assert a.hidden.shape == a.target_hidden.shape == (rows, refine.rollout_len, config.model.hidden_size)
    assert a.positions.shape == a.entropies.shape == (batch.batch_size, refine.num_chunks)
    assert bool((a.logprobs <= 0).all()) and bool(torch.isfinite(a.logprobs).all())
    assert 0 <= int(a.tokens.min()) and int(a.tokens.max()) < config.model.vocab_size
    # Each rollout starts inside its document, and its ground truth is the document's own continuation.
    for row in range(rows):
        doc, chunk = divmod(row // refine.num_samples, refine.num_chunks)
        start = int(a.positions[doc, chunk])
        assert 1 <= start and start + refine.rollout_len <= int(batch.lengths[doc])
        assert a.target_tokens[row].tolist() == batch.token_ids[doc, start:start + refine.rollout_len].tolist()

    other_seed = (config.train.seed + 1, batch.cursor.epoch, batch.cursor.offset)
    other = first.rollout(batch.token_ids, batch.lengths, batch_generator(*other_seed))
    assert not torch.equal(other.tokens, a.tokens)

    # Other weights, same documents and seed: other rollouts.
    second.load_weights(moved_weights(weights, seed=8), 6)
    c = second.rollout(batch.token_ids, batch.lengths, batch_generator(*seed))
    assert not torch.equal(c.logprobs, a.logprobs)


def test_load_weights_refuses_a_mismatching_state_dict_and_keeps_its_weights(tiny_config) -> None:
    """A state dict with a missing, an unexpected or a wrongly shaped tensor is refused before any tensor is
    copied: the engine keeps its weights and its weight version."""
    engine = SnapshotEngine(tiny_config())
    good = engine.model.state_dict()
    engine.load_weights(good, 1)
    kept = {n: v.clone() for n, v in engine.model.state_dict().items()}
    name = next(n for n, v in good.items() if v.dim() == 2)
    others = moved_weights(good, seed=3)  # what a partial load would have copied in

    missing = {n: v for n, v in others.items() if n != name}
    with pytest.raises(ValueError, match=rf"weights do not fit the served model: missing \['{name}'\]"):
        engine.load_weights(missing, 2)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        engine.load_weights({**others, "extra.weight": torch.zeros(2)}, 2)
    with pytest.raises(ValueError, match=rf"shapes \['{name} \("):
        engine.load_weights({**others, name: good[name][:, :-1].clone()}, 2)
    assert engine.weight_version == 1
    for n, v in engine.model.state_dict().items():
        assert torch.equal(v, kept[n]), n
