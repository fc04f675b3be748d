"""`refine data inspect`: what a run's data settings make of its source, before a run starts.

It reads data.source exactly as training does (the run's tokenizer, data.seq_len, data.min_length,
data.max_windows, data.shuffle's first pass), through one pass or its first `max_documents` documents, and
summarizes it: documents and tokens kept, what was dropped or cut and why, document lengths, and the optimizer
steps one pass takes at train.batch_size.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from itertools import islice
from typing import Any

from refine.config import RunConfig
from refine.data.documents import DocumentStream
from refine.data.sources import DataSourceError
from refine.data.stream import _source_stream, synthetic_documents
from refine.tokenizer import Tokenizer


class LengthCounts:
    """How many documents have each length: the length statistics of a pass in memory bounded by data.seq_len
    (a list of every length took some 46 bytes a document: gigabytes for a pass of 100 million)."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def add(self, length: int) -> None:
        self.counts[length] += 1

    def __len__(self) -> int:
        return sum(self.counts.values())

    def total(self) -> int:
        return sum(length * count for length, count in self.counts.items())

    def nth(self, index: int) -> int:
        """The length at `index` (0-based) in sorted order."""
        seen = 0
        for length in sorted(self.counts):
            seen += self.counts[length]
            if index < seen:
                return length
        raise IndexError(index)

    def median(self) -> float | int:
        """As statistics.median: the middle length, or the mean of the two middle ones."""
        count = len(self)
        if count % 2:
            return self.nth(count // 2)
        return (self.nth(count // 2 - 1) + self.nth(count // 2)) / 2

    def percentile(self, share: float) -> int:
        """The nearest-rank percentile: the smallest length at least `share` of the documents are at or below."""
        return self.nth(max(0, math.ceil(share * len(self)) - 1))


def inspect_data(config: RunConfig, tokenizer: Tokenizer, max_documents: int | None = 10_000) -> dict[str, Any]:
    """The summary of data.source under `config` (see the module docstring); `max_documents` None: one pass.
    Only a count of the documents of each length is kept, so a whole pass over a large corpus takes little
    memory."""
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
    documents = len(lengths)
    if not documents:
        raise ValueError(f"data.source={spec.source!r} gives no document of at least data.min_length="
                         f"{spec.min_length} tokens under these settings: {read}")
    summary: dict[str, Any] = {
        "source": spec.source,
        "whole_pass": complete,
        "documents": documents,
        "tokens": lengths.total(),
        "document_tokens": {"min": min(lengths.counts), "median": lengths.median(), "p90": lengths.percentile(0.9),
                            "max": max(lengths.counts), "mean": round(lengths.total() / documents, 1)},
        "full_length_share": round(lengths.counts[spec.seq_len] / documents, 4),
        "read": read,
        "first_documents": first_ids,
        "settings": {"seq_len": spec.seq_len, "min_length": spec.min_length, "max_windows": spec.max_windows,
                     "shuffle": spec.shuffle, "batch_size": config.train.batch_size,
                     "tokenizer": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size},
    }
    if complete:
        summary["steps_per_pass"] = -(-documents // config.train.batch_size)
    return summary


def _lengths_and_first_ids(documents: Iterable[tuple[str, list[int]]]) -> tuple[LengthCounts, list[str]]:
    """The documents' length counts and their first five ids: all a summary keeps of them."""
    lengths, first_ids = LengthCounts(), []
    for doc_id, ids in documents:
        lengths.add(len(ids))
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
