"""Document batches: right-padded token ids plus each row's length."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from refine.models.state import is_integer_dtype


@dataclass
class DocumentBatch:
    input_ids: Tensor  # [B, T] right-padded with pad_id
    lengths: Tensor  # [B]
    doc_ids: list[str]
    cursor: int = 0  # data position after this batch, for exact resume
    # The data position after each document: where the stream restarted a pass (a position that does not
    # move forward), which `cursor` alone cannot show when a batch holds more than a pass.
    cursors: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "DocumentBatch":
        return DocumentBatch(self.input_ids.to(device), self.lengths.to(device), self.doc_ids, self.cursor,
                             self.cursors)


def pad_documents(docs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    if not docs:
        raise ValueError("cannot build a batch from zero documents")
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.long)
    if (lengths == 0).any():
        raise ValueError(f"document {int((lengths == 0).nonzero()[0])} of the batch is empty")
    ids = torch.full((len(docs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, doc in enumerate(docs):
        tokens = torch.as_tensor(doc if isinstance(doc, torch.Tensor) else list(doc))
        if not is_integer_dtype(tokens.dtype):
            raise ValueError(f"document {row} of the batch holds {tokens.dtype} values, not token ids: "
                             f"{tokens[:8].tolist()}...")
        ids[row, : len(doc)] = tokens
    return ids, lengths


def batch_documents(
    documents: Iterable[tuple[str, Sequence[int], int]], batch_size: int, pad_id: int = 0,
) -> Iterator[DocumentBatch]:
    """Group (doc_id, token ids, cursor after it) into batches; the last partial batch is kept."""
    ids: list[str] = []
    tokens: list[Sequence[int]] = []
    cursors: list[int] = []
    cursor = 0
    for doc_id, doc, cursor in documents:
        ids.append(doc_id)
        tokens.append(doc)
        cursors.append(cursor)
        if len(tokens) == batch_size:
            input_ids, lengths = pad_documents(tokens, pad_id)
            yield DocumentBatch(input_ids, lengths, ids, cursor, cursors)
            ids, tokens, cursors = [], [], []
    if tokens:
        input_ids, lengths = pad_documents(tokens, pad_id)
        yield DocumentBatch(input_ids, lengths, ids, cursor, cursors)
