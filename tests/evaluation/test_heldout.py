"""The held-out NTP loss measured during training (refine/evaluation/heldout.py)."""

import json

import pytest
import torch

from refine.algorithm.losses import ntp_loss
from refine.config import load_config, run_tokenizer
from refine.config_parsing import ConfigError
from refine.data.batches import pad_documents
from refine.data.stream import synthetic_documents
from refine.evaluation.heldout import eval_batch_size, heldout_documents, heldout_evaluator, heldout_ntp_loss
from refine.models import build_model


def _config(*overrides):
    return load_config(None, ["train.mode=ntp", "data.seq_len=128", "data.min_length=16", "data.num_documents=8",
                              *overrides])


def test_the_loss_is_the_mean_over_every_target_whatever_the_batch_size():
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", vocab_size=40, hidden_size=32, num_hidden_layers=1, num_heads=2),
                        dtype=torch.float64)
    documents = [torch.randint(0, 40, (length,)).tolist() for length in (50, 7, 33, 90, 2)]
    ids, lengths = pad_documents(documents)
    with torch.no_grad():
        whole = float(ntp_loss(model(ids, lengths=lengths, output_state=False).logits, ids, lengths))
    for batch_size in (1, 2, 5):
        assert heldout_ntp_loss(model, documents, batch_size) == pytest.approx(whole, rel=1e-12)
    # A mean of the batches' means would weigh the 2-token document like the 90-token one.
    means = [heldout_ntp_loss(model, [document], 1) for document in documents]
    assert sum(means) / len(means) != pytest.approx(whole, rel=1e-6)


def test_a_file_source_gives_its_first_documents_read_as_training_reads_them(tmp_path):
    source = tmp_path / "heldout.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["a" * 200, "tiny", "b" * 40, "c" * 60]))
    config = _config(f"data.eval_source={source}", "data.eval_documents=2")
    tokenizer = run_tokenizer(config)
    documents = heldout_documents(config, tokenizer)
    # BOS first, cut to data.seq_len, shorter than data.min_length dropped.
    assert documents == [[tokenizer.bos_id, *b"a" * 127], [tokenizer.bos_id, *b"b" * 40]]
    # A shuffled training source leaves them the first documents.
    shuffled = _config(f"data.source={source}", "data.shuffle=true", f"data.eval_source={source}",
                       "data.eval_documents=2")
    assert heldout_documents(shuffled, tokenizer) == documents


def test_held_out_documents_that_are_the_training_source_are_warned_about(tmp_path, caplog, monkeypatch):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": "words " * 20}) + "\n" for _ in range(3)))
    other = tmp_path / "other.jsonl"
    other.write_text(source.read_text())
    monkeypatch.chdir(tmp_path)
    tokenizer = run_tokenizer(_config())
    heldout_documents(_config(f"data.source={source}", f"data.eval_source={other}"), tokenizer)
    assert "is data.source" not in caplog.text
    heldout_documents(_config(f"data.source={source}", "data.eval_source=./docs.jsonl"), tokenizer)  # the same file
    assert f"data.eval_source='./docs.jsonl' is data.source={str(source)!r} or part of it: the held-out loss is " \
           f"measured on documents the run trains on (3 of them)" in caplog.text
    caplog.clear()
    (tmp_path / "linked.jsonl").hardlink_to(source)
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text(source.read_text())
    for training, held_out in ((tmp_path / "linked.jsonl", source), (folder, folder / "a.jsonl")):
        heldout_documents(_config(f"data.source={training}", f"data.eval_source={held_out}"), tokenizer)
        assert f"data.eval_source={str(held_out)!r} is data.source={str(training)!r} or part of it" in caplog.text
    caplog.clear()
    (tmp_path / "synthetic").mkdir()  # a folder named like the built-in corpus, which data.source is
    (tmp_path / "synthetic" / "a.jsonl").write_text(source.read_text())
    heldout_documents(_config("data.eval_source=./synthetic"), tokenizer)
    assert "or part of it" not in caplog.text
    # The service's learners (every data-parallel rank) leave it to the driver, which says it once.
    same = _config(f"data.source={source}", f"data.eval_source={source}", "data.eval_documents=50")
    assert heldout_documents(same, tokenizer, warn=False) == heldout_documents(same, tokenizer)
    assert "or part of it" in caplog.text and "fewer than data.eval_documents=50" in caplog.text
    caplog.clear()
    model = build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=16, num_hidden_layers=1,
                             num_heads=2))
    heldout_evaluator(same, model, tokenizer, rank=1, world_size=2, warn=False)
    assert caplog.text == ""


def test_the_synthetic_heldout_corpus_is_no_training_corpus_whatever_the_seeds():
    config = _config("data.eval_source=synthetic", "data.eval_documents=4", "data.seq_len=256")
    tokenizer = run_tokenizer(config)
    heldout = heldout_documents(config, tokenizer)
    assert len(heldout) == 4
    for seed in (0, 1, 10_000):  # an offset seed would be another run's training corpus
        other = _config("data.seq_len=256", f"train.seed={seed}")
        training = [ids for _, ids in synthetic_documents(other, tokenizer)]
        assert not any(document in training for document in heldout), seed


def test_the_heldout_forward_takes_as_many_documents_as_a_training_forward():
    assert eval_batch_size(_config("train.batch_size=8")) == 8
    assert eval_batch_size(_config("train.batch_size=8", "train.mini_batches=2", "train.micro_batches=2")) == 2
    assert eval_batch_size(_config("train.batch_size=8", "train.mini_batches=3")) == 3
    assert eval_batch_size(_config("train.batch_size=8", "service.num_learners=4")) == 2


def test_a_measure_that_fails_is_a_warning_not_an_error(caplog):
    config = _config("data.eval_source=synthetic", "data.eval_documents=2", "data.seq_len=256")
    model = build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=16, num_hidden_layers=1,
                             num_heads=2))
    evaluate = heldout_evaluator(config, model, run_tokenizer(config))
    assert evaluate()["eval_ntp_loss"] > 0

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    model.forward = out_of_memory
    assert evaluate() == {}
    assert "was not measured (OutOfMemoryError: CUDA out of memory); training goes on" in caplog.text


def test_bad_eval_sources_are_named(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match=f"data.eval_source='{missing}': data path .* does not exist"):
        heldout_documents(_config(f"data.eval_source={missing}"), run_tokenizer(_config()))
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(ValueError, match=f"data.eval_source='{short}'"):
        heldout_documents(_config(f"data.eval_source={short}"), run_tokenizer(_config()))
    with pytest.raises(ConfigError, match="train.eval_every=5 measures the held-out loss of data.eval_source, which "
                                          "is not set"):
        _config("train.eval_every=5")
    with pytest.raises(ConfigError, match=r"data.eval_documents=1 is fewer than the 2 data.synthetic_tasks"):
        _config("data.eval_source=synthetic", "data.eval_documents=1", "data.synthetic_tasks=[recall,mqar]")


def test_a_source_with_fewer_documents_than_asked_is_measured_on_those_with_a_warning(tmp_path, caplog):
    source = tmp_path / "heldout.jsonl"
    source.write_text("".join(json.dumps({"text": "x" * 60}) + "\n" for _ in range(3)))
    config = _config(f"data.eval_source={source}", "data.eval_documents=50")
    assert len(heldout_documents(config, run_tokenizer(config))) == 3
    assert "holds 3 documents of at least data.min_length=16 tokens, fewer than data.eval_documents=50" in caplog.text


def test_data_parallel_ranks_each_measure_their_share_and_a_failed_rank_fails_every_ranks_measure(caplog):
    config = _config("data.eval_source=synthetic", "data.eval_documents=5", "data.seq_len=256")
    tokenizer = run_tokenizer(config)
    model = build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=16, num_hidden_layers=1,
                             num_heads=2))
    documents = heldout_documents(config, tokenizer)
    whole = heldout_ntp_loss(model, documents, 1)
    shares = []  # what each rank adds to the all-reduce: its loss sum, targets and whether it failed

    def recorded(values):
        shares.append(values)
        return values

    for rank in (0, 1):
        heldout_evaluator(config, model, tokenizer, rank=rank, world_size=2, sum_over_ranks=recorded)()
    assert shares[0][1] + shares[1][1] == sum(len(document) - 1 for document in documents)  # every target once
    total = [a + b for a, b in zip(*shares)]
    rank0 = heldout_evaluator(config, model, tokenizer, rank=0, world_size=2, sum_over_ranks=lambda _: total)
    assert rank0()["eval_ntp_loss"] == pytest.approx(whole, rel=1e-6)
    # Rank 1 failed (out of memory): rank 0 reports nothing, and says why.
    failed = heldout_evaluator(config, model, tokenizer, rank=0, world_size=2,
                               sum_over_ranks=lambda values: [values[0], values[1] + 100, values[2] + 1])
    assert failed() == {}
    assert "was not measured (1 other learner ranks failed to measure theirs); training goes on" in caplog.text
