"""`refine data inspect`: what a run's data settings make of its source, before a run starts.

It reads data.source exactly as training does (the run's tokenizer, data.seq_len, data.min_length,
data.max_windows, data.shuffle's first pass), through one pass or its first `max_documents` documents, and
summarizes it: documents and tokens kept, what was dropped or cut and why, document lengths, and the optimizer
steps one pass takes at train.batch_size.
"""

from __future__ import annotations

import statistics
from itertools import islice
from typing import Any

from refine.config import RunConfig
from refine.data.stream import _source_stream, synthetic_documents
from refine.tokenizer import Tokenizer


def _percentile(sorted_values: list[int], share: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def inspect_data(config: RunConfig, tokenizer: Tokenizer, max_documents: int | None = 10_000) -> dict[str, Any]:
    """The summary of data.source under `config` (see the module docstring); `max_documents` None: one pass."""
    spec = config.data
    if spec.source == "synthetic":
        documents = [(doc_id, ids) for doc_id, ids in synthetic_documents(config, tokenizer)]
        complete = max_documents is None or len(documents) <= max_documents
        documents = documents[:max_documents]
        read: dict[str, Any] = {"records_read": len(documents)}
    else:
        stream = _source_stream(config, tokenizer)
        documents = [(doc.doc_id, doc.token_ids) for doc in islice(stream.iter_from(0), max_documents)]
        read = stream.stats.model_dump(exclude={"documents", "tokens"})  # those are the summary's own
        # The pass is complete when the stream ended before the limit; one more document tells.
        complete = max_documents is None or len(documents) < max_documents or next(iter(stream), None) is None
    if not documents:
        raise ValueError(f"data.source={spec.source!r} gives no document of at least data.min_length="
                         f"{spec.min_length} tokens under these settings: {read}")
    lengths = sorted(len(ids) for _, ids in documents)
    summary: dict[str, Any] = {
        "source": spec.source,
        "whole_pass": complete,
        "documents": len(documents),
        "tokens": sum(lengths),
        "document_tokens": {"min": lengths[0], "median": _percentile(lengths, 0.5),
                            "p90": _percentile(lengths, 0.9), "max": lengths[-1],
                            "mean": round(statistics.fmean(lengths), 1)},
        "full_length_share": round(sum(length == spec.seq_len for length in lengths) / len(lengths), 4),
        "read": read,
        "first_documents": [doc_id for doc_id, _ in documents[:5]],
        "settings": {"seq_len": spec.seq_len, "min_length": spec.min_length, "max_windows": spec.max_windows,
                     "shuffle": spec.shuffle, "batch_size": config.train.batch_size,
                     "tokenizer": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size},
    }
    if complete:
        summary["steps_per_pass"] = -(-len(documents) // config.train.batch_size)
    return summary
