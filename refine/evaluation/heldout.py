"""Held-out NTP loss during training: the next-token loss of `data.eval_source`'s first `data.eval_documents`
documents, every `train.eval_every` steps and at the last step (`eval_ntp_loss` in metrics.jsonl).

The documents are read once, as the training stream reads its source (BOS, `data.seq_len`, `data.min_length`,
`data.max_windows`), or, for `synthetic`, generated like the training corpus from another seed: documents the
run never trains on. The loss is the mean over every next-token target of all of them, as `ntp_loss` is over a
batch, computed `train.batch_size` documents at a time without gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

import torch

from refine.algorithm.losses import ntp_loss
from refine.config import RunConfig
from refine.data.batches import pad_documents
from refine.data.stream import file_documents, synthetic_documents
from refine.models import FastWeightLM
from refine.tokenizer import Tokenizer

# The synthetic held-out corpus' seed is the run's plus this: the training corpus is generated from the run's own.
HELDOUT_SEED_OFFSET = 10_000


def heldout_documents(config: RunConfig, tokenizer: Tokenizer) -> list[list[int]]:
    """The token ids of the held-out documents; a source that yields none fails naming data.eval_source."""
    spec = config.data
    assert spec.eval_source is not None, "no data.eval_source"
    try:
        if spec.eval_source == "synthetic":
            heldout = config.model_copy(update={
                "data": spec.model_copy(update={"source": "synthetic", "num_documents": spec.eval_documents}),
                "train": config.train.model_copy(update={"seed": config.train.seed + HELDOUT_SEED_OFFSET}),
            })
            documents = [ids for _, ids in synthetic_documents(heldout, tokenizer)]
        else:
            heldout = config.model_copy(update={"data": spec.model_copy(update={"source": spec.eval_source})})
            documents = [ids for _, ids, _ in islice(file_documents(heldout, tokenizer, 0, warn=False),
                                                      spec.eval_documents)]
    except (OSError, ValueError) as error:
        raise ValueError(f"data.eval_source={spec.eval_source!r}: {error}") from None
    if not documents:
        raise ValueError(f"data.eval_source={spec.eval_source!r} holds no document of at least data.min_length="
                         f"{spec.min_length} tokens")
    return documents


@torch.no_grad()
def heldout_ntp_loss(model: FastWeightLM, documents: list[list[int]], batch_size: int, pad_id: int = 0) -> float:
    """The mean next-token loss over every target of `documents`, `batch_size` documents at a time."""
    total, targets = 0.0, 0
    for start in range(0, len(documents), batch_size):
        ids, lengths = pad_documents(documents[start:start + batch_size], pad_id)
        ids, lengths = ids.to(model.device), lengths.to(model.device)
        count = int((lengths - 1).clamp(min=0).sum())
        total += float(ntp_loss(model(ids, lengths=lengths, output_state=False).logits, ids, lengths)) * count
        targets += count
    return total / targets


def heldout_evaluator(config: RunConfig, model: FastWeightLM, tokenizer: Tokenizer) -> Callable[[], dict[str, float]]:
    """Read the held-out documents now (a bad data.eval_source fails before the first step); the function that
    measures `model` on them, as a metrics.jsonl row's `eval_ntp_loss`."""
    documents = heldout_documents(config, tokenizer)
    pad_id = tokenizer.pad_id or 0

    def evaluate() -> dict[str, float]:
        return {"eval_ntp_loss": heldout_ntp_loss(model, documents, config.train.batch_size, pad_id)}

    return evaluate
