"""The held-out NTP loss measured during training (refine/evaluation/heldout.py)."""

import json

import pytest
import torch

from refine.algorithm.losses import ntp_loss
from refine.config import ConfigError, load_config, run_tokenizer
from refine.data.batches import pad_documents
from refine.data.stream import synthetic_documents
from refine.evaluation.heldout import heldout_documents, heldout_ntp_loss
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


def test_the_synthetic_heldout_corpus_is_not_the_training_corpus():
    config = _config("data.eval_source=synthetic", "data.eval_documents=4", "data.seq_len=256")
    tokenizer = run_tokenizer(config)
    heldout = heldout_documents(config, tokenizer)
    training = [ids for _, ids in synthetic_documents(config, tokenizer)]
    assert len(heldout) == 4 and not any(document in training for document in heldout)


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
