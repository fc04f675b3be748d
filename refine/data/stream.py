"""Endless, resumable document batches for training, from a file source or the synthetic corpus."""

from __future__ import annotations

from collections.abc import Iterator

from refine.config import RunConfig
from refine.data.batches import DocumentBatch, batch_documents
from refine.data.sources import DataConfig, iter_documents
from refine.tokenizer import Tokenizer


Item = tuple[str, list[int], int]  # (doc_id, token ids, cursor to resume after this document)


def _synthetic_documents(config: RunConfig, tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    from refine.data.synthetic import RecallCorpusConfig, generate_recall_documents

    # About one fact per 200 tokens keeps room for the prose that separates statement and recall.
    num_facts = max(1, min(6, config.data.seq_len // 200))
    corpus = RecallCorpusConfig(length=config.data.seq_len, num_facts=num_facts, seed=config.train.seed)
    docs = []
    for doc in generate_recall_documents(corpus, tokenizer, config.data.num_documents):
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []  # as file sources do
        ids = (bos + tokenizer.encode(doc.text))[: config.data.seq_len]
        if len(ids) >= config.data.min_length:
            docs.append((doc.doc_id, ids))
    if not docs:
        raise ValueError(f"the synthetic corpus produced no document of data.min_length={config.data.min_length}")
    return docs


def _file_documents(config: RunConfig, tokenizer: Tokenizer, cursor: int) -> Iterator[Item]:
    spec = config.data
    data = DataConfig(path=spec.source, text_column=spec.text_column, min_length=spec.min_length,
                      max_length=spec.seq_len, skip_bad_rows=spec.skip_bad_rows, show_progress=False)
    for doc in iter_documents(data, tokenizer, cursor=cursor):
        yield doc.doc_id, doc.token_ids, doc.index + 1  # record index: filtered and bad rows count too


def document_stream(config: RunConfig, tokenizer: Tokenizer, start_cursor: int = 0) -> Iterator[Item]:
    """Documents forever, cycling over the source (the cursor restarts at 0 with each pass)."""
    if config.data.source == "synthetic":
        docs = _synthetic_documents(config, tokenizer)
        index = start_cursor % len(docs)
        while True:
            doc_id, ids = docs[index]
            index = (index + 1) % len(docs)
            yield doc_id, ids, index
    epoch_cursor = start_cursor
    while True:
        produced = 0
        for item in _file_documents(config, tokenizer, epoch_cursor):
            produced += 1
            yield item
        if produced == 0:
            raise ValueError(f"data.source={config.data.source!r} yielded no document of at least "
                             f"data.min_length={config.data.min_length} tokens")
        epoch_cursor = 0


def document_batches(config: RunConfig, tokenizer: Tokenizer, start_cursor: int = 0) -> Iterator[DocumentBatch]:
    pad_id = getattr(tokenizer, "pad_id", None) or 0
    return batch_documents(document_stream(config, tokenizer, start_cursor), config.train.batch_size, pad_id)
