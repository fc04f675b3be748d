"""Fixtures of the evaluation tests: a tiny saved model and task files of RULER QA and LongBench rows."""

from pathlib import Path

import pytest
import torch
from eval_helpers import LONGBENCH_ROWS, RULER_ROWS, TOKENIZER, write_jsonl

from refine.models import build_model, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                             vocab_size=TOKENIZER.vocab_size, intermediate_size=64, tie_word_embeddings=True,
                             bos_token_id=257, eos_token_id=258, pad_token_id=256))
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def task_files(tmp_path) -> dict[str, Path]:
    return {"ruler-qa": write_jsonl(tmp_path / "ruler_qa.jsonl", RULER_ROWS),
            "longbench": write_jsonl(tmp_path / "longbench.jsonl", LONGBENCH_ROWS)}
