"""`refine data inspect`: what a run's data settings make of its source, before a run starts.

It reads data.source exactly as training does (the run's tokenizer, data.seq_len, data.min_length,
data.max_windows, data.shuffle's first pass), through one pass or its first `max_documents` documents, and
summarizes it: documents and tokens kept, what was dropped or cut and why, document lengths, and the optimizer
steps one pass takes at train.batch_size.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from itertools import islice
from typing import Any

from refine.config import RunConfig
from refine.data.sources import DataSourceError, DocumentStream
from refine.data.stream import _source_stream, synthetic_documents
from refine.tokenizer import Tokenizer


def _percentile(sorted_values: list[int], share: float) -> int:
    """The nearest-rank percentile: the smallest value at least `share` of the values are at or below."""
    return sorted_values[max(0, math.ceil(share * len(sorted_values)) - 1)]


def inspect_data(config: RunConfig, tokenizer: Tokenizer, max_documents: int | None = 10_000) -> dict[str, Any]:
    """The summary of data.source under `config` (see the module docstring); `max_documents` None: one pass.
    Only the documents' lengths are kept, so a whole pass over a large corpus takes little memory."""
    spec = config.data
    if spec.source == "synthetic":
        corpus = synthetic_documents(config, tokenizer)
        lengths, first_ids = _lengths_and_first_ids(corpus[:max_documents])
        complete = max_documents is None or len(corpus) <= max_documents
        # The corpus is generated whole: what data.min_length dropped of it.
        read: dict[str, Any] = {"generated": spec.num_documents, "too_short": spec.num_documents - len(corpus)}
    else:
        stream = _source_stream(config, tokenizer)
        if max_documents is not None:  # read record by record, so the counts stop with the last document
            stream.config = stream.config.model_copy(update={"tokenize_batch_size": 1})
        lengths, first_ids = _lengths_and_first_ids(
            (doc.doc_id, doc.token_ids) for doc in islice(stream.iter_from(0), max_documents))
        read = stream.stats.model_dump(exclude={"documents", "tokens"})  # those are the summary's own
        complete = max_documents is None or len(lengths) < max_documents
        if not complete and _ends_here(stream):
            # The rest of the pass held only records that give no document (too short, blank, bad rows):
            # the counts of a whole pass include them.
            complete, read = True, stream.stats.model_dump(exclude={"documents", "tokens"})
    if not lengths:
        raise ValueError(f"data.source={spec.source!r} gives no document of at least data.min_length="
                         f"{spec.min_length} tokens under these settings: {read}")
    lengths.sort()
    summary: dict[str, Any] = {
        "source": spec.source,
        "whole_pass": complete,
        "documents": len(lengths),
        "tokens": sum(lengths),
        "document_tokens": {"min": lengths[0], "median": statistics.median(lengths),
                            "p90": _percentile(lengths, 0.9), "max": lengths[-1],
                            "mean": round(statistics.fmean(lengths), 1)},
        "full_length_share": round(sum(length == spec.seq_len for length in lengths) / len(lengths), 4),
        "read": read,
        "first_documents": first_ids,
        "settings": {"seq_len": spec.seq_len, "min_length": spec.min_length, "max_windows": spec.max_windows,
                     "shuffle": spec.shuffle, "batch_size": config.train.batch_size,
                     "tokenizer": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size},
    }
    if complete:
        summary["steps_per_pass"] = -(-len(lengths) // config.train.batch_size)
    return summary


def _lengths_and_first_ids(documents: Iterable[tuple[str, list[int]]]) -> tuple[list[int], list[str]]:
    """The documents' lengths and their first five ids: all a summary keeps of them."""
    lengths, first_ids = [], []
    for doc_id, ids in documents:
        lengths.append(len(ids))
        if len(first_ids) < 5:
            first_ids.append(doc_id)
    return lengths, first_ids


def _ends_here(stream: DocumentStream) -> bool:
    """Whether the pass has no document past the stream's cursor; a bad row there counts as more to read (it
    is past the documents asked for: a whole pass reports it)."""
    try:
        return next(iter(stream), None) is None
    except DataSourceError:
        return False
