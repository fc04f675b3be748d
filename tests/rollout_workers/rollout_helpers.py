"""Document batches for the rollout worker tests, built the way the orchestrator publishes them."""

from __future__ import annotations

import torch

from refine.config import RunConfig
from refine.data.stream import DataPosition, document_batches
from refine.tokenizer import load_tokenizer
from services.messages import DocumentBatch
from services.orchestrator import data_cursor
from services.streams import document_batch_id_for


def orchestrator_batches(config: RunConfig, count: int) -> list[DocumentBatch]:
    """The first `count` document batches of the run's data stream, as the orchestrator's
    `_next_message` builds them (ids docs-0, docs-1, ...; int32 token ids; data cursor)."""
    position = DataPosition(epoch=0, cursor=-1)
    stream = document_batches(config, load_tokenizer(config.tokenizer))
    batches = []
    for index in range(count):
        batch = next(stream)
        batches.append(DocumentBatch(
            batch_id=document_batch_id_for(index), doc_ids=batch.doc_ids, token_ids=batch.input_ids.to(torch.int32),
            lengths=batch.lengths, cursor=data_cursor(position, batch, config.data.source),
        ))
    return batches


def moved_weights(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`state_dict` with seeded noise added to every float tensor: other weights of the same shapes.
    Tensors that share storage (tied embeddings) get the same noise, so they stay tied."""
    generator = torch.Generator().manual_seed(seed)
    moved: dict[int, torch.Tensor] = {}
    weights = {}
    for name, value in state_dict.items():
        if value.data_ptr() not in moved:
            noise = 0.05 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
            moved[value.data_ptr()] = value + noise if value.is_floating_point() else value.clone()
        weights[name] = moved[value.data_ptr()]
    return weights
