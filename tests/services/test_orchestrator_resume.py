"""What a service run's --resume refuses before it starts Ray or Redis (services.orchestrator.run)."""

from __future__ import annotations

import json

import pytest
from test_tokenizer import write_bpe_tokenizer

from refine.config import load_config
from refine.loop import train
from services.orchestrator import run


def test_a_service_resume_refuses_a_tokenizer_other_than_the_checkpoints(tmp_path):
    write_bpe_tokenizer(tmp_path / "tok")
    settings = [f"train.out_dir={tmp_path / 'run'}", "train.mode=onepass", "train.batch_size=2", "refine.num_chunks=2",
                "data.seq_len=256", "data.num_documents=8", "model.hidden_size=32", "model.intermediate_size=64",
                "model.vocab_size=320", f"tokenizer={tmp_path / 'tok'}"]
    train(load_config(None, [*settings, "train.steps=1"]), progress=False)  # the checkpoint a service resumes alike
    tree = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    vocab = tree["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # the file rewritten since: two tokens trade ids
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tree))
    with pytest.raises(ValueError, match=f"--resume: tokenizer '{tmp_path / 'tok'}' is not the one checkpoint "):
        run(load_config(None, [*settings, "train.steps=3"]), resume=True, progress=False)
