"""Held-out NTP loss during training: the next-token loss of `data.eval_source`'s first `data.eval_documents`
documents, every `train.eval_every` steps and at the last step (`eval_ntp_loss` in metrics.jsonl).

The documents are read once, as the training stream reads its source (BOS, `data.seq_len`, `data.min_length`,
`data.max_windows`), or, for `synthetic`, generated like the training corpus from the random streams held-out
sets draw (refine.data.synthetic's purpose "heldout"), which no training corpus draws from, whatever its seed.
The loss is the mean over every next-token target of all of them, as `ntp_loss` is over a batch, computed
without gradient as many documents at a time as one training forward takes (`eval_batch_size`), so that it
needs no more memory than a step. A measure that fails (out of memory, say) is a warning: training goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch

from refine.algorithm.losses import ntp_loss
from refine.config import RunConfig
from refine.data.batches import pad_documents
from refine.data.stream import file_documents, synthetic_documents
from refine.models import FastWeightLM
from refine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def heldout_documents(config: RunConfig, tokenizer: Tokenizer, warn: bool = True) -> list[list[int]]:
    """The token ids of the held-out documents; a source that yields none fails naming data.eval_source. `warn`:
    say when they are part of data.source, or fewer than data.eval_documents (once a run: the service's driver
    says it, its learners do not)."""
    spec = config.data
    assert spec.eval_source is not None, "no data.eval_source"
    try:
        if spec.eval_source == "synthetic":
            heldout = config.model_copy(update={
                "data": spec.model_copy(update={"source": "synthetic", "num_documents": spec.eval_documents})})
            documents = [ids for _, ids in synthetic_documents(heldout, tokenizer, purpose="heldout")]
        else:
            # The first documents in the source's order, whatever data.shuffle does to the training source.
            heldout = config.model_copy(update={"data": spec.model_copy(update={"source": spec.eval_source,
                                                                                "shuffle": False})})
            documents = [ids for _, ids, _ in islice(file_documents(heldout, tokenizer, 0, warn=False),
                                                      spec.eval_documents)]
    except (OSError, ValueError) as error:
        raise ValueError(f"data.eval_source={spec.eval_source!r}: {error}") from None
    if not documents:
        raise ValueError(f"data.eval_source={spec.eval_source!r} holds no document of at least data.min_length="
                         f"{spec.min_length} tokens")
    if not warn:
        return documents
    if "synthetic" not in (spec.eval_source, spec.source) and _within(spec.eval_source, spec.source):
        logger.warning("data.eval_source=%r is data.source=%r or part of it: the held-out loss is measured on "
                       "documents the run trains on (%d of them), so it does not show how the model does on unseen "
                       "text", spec.eval_source, spec.source, len(documents))
    if len(documents) < spec.eval_documents:
        logger.warning("data.eval_source=%r holds %d documents of at least data.min_length=%d tokens, fewer than "
                       "data.eval_documents=%d: the held-out loss is measured on those", spec.eval_source,
                       len(documents), spec.min_length, spec.eval_documents)
    return documents


def _within(path: str, source: str) -> bool:
    """Whether `path` is the file or folder `source` (a link to it included), or inside folder `source`."""
    try:
        inner, outer = Path(path).expanduser(), Path(source).expanduser()
        if inner.exists() and outer.exists() and inner.samefile(outer):
            return True
        return outer.is_dir() and outer.resolve() in inner.resolve().parents
    except (OSError, RuntimeError):  # a symlink loop, a path too long: not worth a failure here
        return False


def eval_batch_size(config: RunConfig) -> int:
    """Documents per held-out forward: as many as one training forward takes (a rank's micro-batch)."""
    train = config.train
    learners = config.service.num_learners if config.service.mode == "disaggregated" else 1
    return max(1, math.ceil(train.batch_size / (train.mini_batches * train.micro_batches * learners)))


@torch.no_grad()
def heldout_sums(model: FastWeightLM, documents: list[list[int]], batch_size: int,
                 pad_id: int = 0) -> tuple[float, int]:
    """The next-token loss summed over every target of `documents`, and the number of targets, `batch_size`
    documents at a time."""
    total, targets = 0.0, 0
    for start in range(0, len(documents), batch_size):
        ids, lengths = pad_documents(documents[start:start + batch_size], pad_id)
        ids, lengths = ids.to(model.device), lengths.to(model.device)
        count = int((lengths - 1).clamp(min=0).sum())
        total += float(ntp_loss(model(ids, lengths=lengths, output_state=False).logits, ids, lengths)) * count
        targets += count
    return total, targets


def heldout_ntp_loss(model: FastWeightLM, documents: list[list[int]], batch_size: int, pad_id: int = 0) -> float:
    """The mean next-token loss over every target of `documents`, `batch_size` documents at a time."""
    total, targets = heldout_sums(model, documents, batch_size, pad_id)
    return total / targets


# Sums a list of numbers over the data-parallel learners (every rank calls it at the same step).
SumOverRanks = Callable[[list[float]], list[float]]


def heldout_evaluator(config: RunConfig, model: FastWeightLM, tokenizer: Tokenizer, rank: int = 0,
                      world_size: int = 1, sum_over_ranks: SumOverRanks | None = None,
                      warn: bool = True) -> Callable[[], dict[str, float]]:
    """Read the held-out documents now (a bad data.eval_source fails before the first step); the function that
    measures `model` on them, as a metrics.jsonl row's `eval_ntp_loss` and the seconds it took, `eval_seconds`
    (not part of `step_seconds`). With data-parallel learners every rank measures every `world_size`-th
    document from its `rank`, and `sum_over_ranks` adds up the ranks' sums: each rank calls the function.
    `warn` as heldout_documents'."""
    documents = heldout_documents(config, tokenizer, warn)[rank::world_size]
    pad_id, batch_size = tokenizer.pad_id or 0, eval_batch_size(config)

    def evaluate() -> dict[str, float]:
        started = time.perf_counter()
        failure: Exception | None = None
        try:
            total, targets = heldout_sums(model, documents, batch_size, pad_id)  # floats: the device is waited for
        except Exception as error:  # noqa: BLE001 - a lost measure must not lose the run's training
            total, targets, failure = 0.0, 0, error
        failed_ranks = float(failure is not None)
        if sum_over_ranks is not None:  # every rank joins, the one that failed too, or the others would wait
            total, targets, failed_ranks = sum_over_ranks([total, float(targets), failed_ranks])
        if failed_ranks:
            cause = (f"{type(failure).__name__}: {failure}" if failure is not None
                     else f"{int(failed_ranks)} other learner ranks failed to measure theirs")
            logger.warning("the held-out loss of data.eval_source=%r was not measured (%s); training goes on",
                           config.data.eval_source, cause)
            return {}
        return {"eval_ntp_loss": total / targets, "eval_seconds": time.perf_counter() - started}

    return evaluate
