"""Names every role agrees on, and the shared state that is not a stream message.

Pipeline: documents -> (rollout workers) -> rollouts -> (reward replicas) -> scored -> (learner).
In colocated mode the learner consumes `documents` itself.

The learner needs the token ids of the documents a rollout batch came from. A RolloutBatch only
names its DocumentBatch, so the orchestrator also stores every published DocumentBatch under
`<namespace>:document_batch:<batch_id>` (same codec, never pickle) and the learner deletes it once
the batch is trained or dropped. Rollout messages stay small, and the documents cross the wire to
the learner once, not through every hop.
"""

from __future__ import annotations

import redis
from pydantic import BaseModel

from refine.algorithm.selection import min_document_length
from refine.config import DTYPES, RunConfig
from services.broker import Broker
from services.codec import DEFAULT_LIMITS, decode, dtype_name, encode
from services.messages import DocumentBatch, RolloutBatch

__all__ = [
    "CONSUMED_KEY",
    "DOCUMENTS",
    "DROPPED_KEY",
    "DocumentStore",
    "LEARNER_GROUP",
    "LEARNER_REPORTS",
    "ORCHESTRATOR_GROUP",
    "REWARD_GROUP",
    "ROLLOUTS",
    "ROLLOUT_GROUP",
    "SCORED",
    "document_batch_id_for",
    "document_batch_index",
    "make_run_streams",
    "release_consumer",
    "rollout_batch_id_for",
    "run_groups",
    "trim_acknowledged",
    "unpublishable_reason",
    "unusable_documents",
]

DOCUMENTS = "documents"
ROLLOUTS = "rollouts"
SCORED = "scored"
LEARNER_REPORTS = "learner_reports"

ROLLOUT_GROUP = "rollout"
REWARD_GROUP = "reward"
LEARNER_GROUP = "learner"
ORCHESTRATOR_GROUP = "orchestrator"

# Broker consumed-sets: rollout batches (or, colocated, document batches) the learner trained on,
# and those it dropped as too stale. A message id is in at most one of them.
CONSUMED_KEY = "learner"
DROPPED_KEY = "learner-dropped"


def run_groups(colocated: bool) -> list[tuple[str, str]]:
    """Every (stream, consumer group) of a run: the learner's reports, read by the orchestrator, then the pipeline."""
    groups = [(LEARNER_REPORTS, ORCHESTRATOR_GROUP)]
    if colocated:
        return groups + [(DOCUMENTS, LEARNER_GROUP)]
    return groups + [(DOCUMENTS, ROLLOUT_GROUP), (ROLLOUTS, REWARD_GROUP), (SCORED, LEARNER_GROUP)]


def make_run_streams(broker: Broker, colocated: bool) -> None:
    """The run's streams with their consumer groups, each reading its stream from the start: the driver makes them
    before any role starts, as roles make no stream (services.role)."""
    for stream, group in run_groups(colocated):
        broker.ensure_group(stream, group, start_id="0")


_DOCUMENT_BATCH_PREFIX = "docs-"


def document_batch_id_for(index: int) -> str:
    """Id of the `index`-th document batch the orchestrator publishes in a run (0 first). The learner
    reads the index back to know which batches, in data order, it has finished."""
    if index < 0:
        raise ValueError(f"document batch index must be >= 0, got {index}")
    return f"{_DOCUMENT_BATCH_PREFIX}{index}"


def document_batch_index(batch_id: str) -> int | None:
    """The publish index of a document batch id from `document_batch_id_for`; None for any other id
    (a batch that is not part of the run's data stream)."""
    digits = batch_id.removeprefix(_DOCUMENT_BATCH_PREFIX)
    if digits == batch_id or not digits.isdigit() or not digits.isascii():
        return None
    return int(digits)


def rollout_batch_id_for(document_batch_id: str) -> str:
    """Rollouts of one document batch always get the same id, whichever worker makes them and how
    often (a reclaimed batch is rolled out again): the learner's exactly-once guard then covers the
    documents, not just one message."""
    return f"{document_batch_id}.rollouts"


class DocumentStore:
    """Document batches by id, for the learner to read the documents behind a rollout batch."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def _key(self, batch_id: str) -> str:
        return self.broker.key("document_batch", batch_id)

    def put(self, batch: DocumentBatch) -> None:
        self.broker.client.set(self._key(batch.batch_id), encode(batch, self.broker.limits),
                               px=self.broker.key_ttl_ms)

    def get(self, batch_id: str) -> DocumentBatch | None:
        data = self.broker.client.get(self._key(batch_id))
        return None if data is None else decode(data, DocumentBatch, self.broker.limits)

    def delete(self, batch_id: str) -> None:
        self.broker.client.delete(self._key(batch_id))

    def count(self) -> int:
        return sum(1 for _ in self.broker.client.scan_iter(match=self._key("*"), count=500))


def unpublishable_reason(message: BaseModel, error: Exception) -> str:
    """Why a role's result `message` can never go onto its stream (`error`: the CodecError encoding it
    raised), for the dead letter of the input it was made from. A message over the codec's size limits
    names the limit's setting and the run settings that size the message: publishing again fails the
    same way, until one of them changes."""
    reason = " ".join(str(error).split())
    limit = next((name for name in ("max_message_bytes", "max_tensor_elements") if f"{name}=" in reason), None)
    if limit is None:
        return reason  # not about size (NaN/Inf values, say): the codec's text names the field
    default = getattr(DEFAULT_LIMITS, limit)
    shown = f"{default} = {default / 2**20:g} MiB" if limit == "max_message_bytes" else f"{default}"
    reason += f" (the limit services.codec.CodecLimits.{limit}, {shown} by default; not a run setting)"
    if not isinstance(message, RolloutBatch):
        return reason
    batch, chunks = message.positions.shape
    n, k = message.num_samples, message.rollout_len
    rows = batch * chunks * n
    reason += (f"; {type(message).__name__} {message.rollout_batch_id} holds train.batch_size={batch} x "
               f"refine.num_chunks={chunks} x refine.num_samples={n} = {rows} rollouts of refine.rollout_len={k} "
               f"tokens")
    hidden = {name: getattr(message, name) for name in ("rollout_hidden", "ground_truth_hidden")
              if getattr(message, name) is not None}
    if hidden:
        first = next(iter(hidden.values()))
        size, dtype, itemsize = int(first.shape[2]), dtype_name(first.dtype), first.element_size()
        total = sum(tensor.numel() * tensor.element_size() for tensor in hidden.values())
        reason += (f", each token with {len(hidden)} hidden states ({', '.join(hidden)}) of model.hidden_size={size} "
                   f"{dtype} values: {len(hidden)} x {rows} x {k} x {size} x {itemsize} bytes = {total} bytes of it")
    return reason + "; lower one of these settings so that it fits"


def unusable_documents(batch: DocumentBatch, config: RunConfig) -> str | None:
    """Why the run's model cannot roll `batch` out (naming the field, the value and the limit), or None: a
    token id at or past model.vocab_size (an IndexError inside the embedding; on a GPU, a device-side assert
    that breaks the process), a document shorter than rollouts need. Vectorised: two host reads when it fits."""
    problem = batch.vocabulary_misfit(config.model.vocab_size)
    if problem is not None:
        return problem
    refine = config.refine
    need = min_document_length(refine.num_chunks, refine.rollout_len, refine.margin)
    if int(batch.lengths.min()) >= need:
        return None
    doc = int((batch.lengths < need).nonzero()[0, 0])
    return (f"lengths[{doc}]={int(batch.lengths[doc])} is too short: rollouts need documents of at least {need} "
            f"tokens (refine.num_chunks={refine.num_chunks}, refine.rollout_len={refine.rollout_len}, "
            f"refine.margin={refine.margin})")


def check_rollout_message_size(config: RunConfig) -> None:
    """Refuse, before anything starts, a disaggregated run whose rollout batches cannot fit one message: their
    two hidden states per rollout token (the rollouts' and the ground truth's) alone exceed the codec's
    max_message_bytes, so every batch would be rolled out and then dead-lettered (`unpublishable_reason`)."""
    hidden_size = getattr(config.model, "hidden_size", None)
    if config.service.mode != "disaggregated" or not isinstance(hidden_size, int):
        return
    train, refine = config.train, config.refine
    rows = train.batch_size * refine.num_chunks * refine.num_samples
    itemsize = DTYPES[train.dtype].itemsize
    hidden_bytes = 2 * rows * refine.rollout_len * hidden_size * itemsize
    limit = DEFAULT_LIMITS.max_message_bytes
    if hidden_bytes > limit:
        raise ValueError(
            f"a rollout batch would not fit one message: train.batch_size={train.batch_size} x refine.num_chunks="
            f"{refine.num_chunks} x refine.num_samples={refine.num_samples} = {rows} rollouts of refine.rollout_len="
            f"{refine.rollout_len} tokens, each token with 2 hidden states of model.hidden_size={hidden_size} "
            f"({train.dtype}) take {hidden_bytes} bytes, over the codec's max_message_bytes={limit}: lower one of "
            f"these settings")


def release_consumer(broker: Broker, stream: str, group: str, consumer: str, batch: int = 1000) -> int:
    """Make every entry a dead consumer still holds reclaimable at once; returns how many.

    XAUTOCLAIM hands out entries idle for longer than a threshold, which must exceed the longest
    time a live consumer can spend on one entry. When the orchestrator *knows* a consumer is dead
    (its actor died), waiting that long is pointless: this resets the idle time of the dead
    consumer's entries (XCLAIM ... IDLE, ownership unchanged, delivery count untouched) so the next
    XAUTOCLAIM of any live consumer takes them over.
    """
    key = broker.key("stream", stream)
    try:
        rows = broker.client.xpending_range(key, group, "-", "+", batch, consumername=consumer)
    except redis.ResponseError as exc:
        if "NOGROUP" in str(exc):
            return 0
        raise
    ids = [row["message_id"] for row in rows]
    if not ids:
        return 0
    ten_days_ms = 10 * 24 * 3600 * 1000
    broker.client.xclaim(key, group, consumer, 0, ids, idle=ten_days_ms, justid=True)
    return len(ids)


# Check and delete in one atomic step: between a separate XINFO and DELCONSUMER, a consumer whose process still
# runs (killed, not yet gone) could read an entry, and DELCONSUMER would drop that entry's pending record with it.
# KEYS: the stream. ARGV: the group, then the consumers to keep.
_DELETE_IDLE_CONSUMERS_LUA = """
local keep = {}
for i = 2, #ARGV do keep[ARGV[i]] = true end
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
  if not keep[fields['name']] and fields['pending'] == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
    table.insert(removed, fields['name'])
  end
end
return removed
"""


def delete_idle_consumers(broker: Broker, stream: str, group: str, keep: set[str]) -> list[str]:
    """Remove from `group` the consumers not in `keep` that hold no entry; returns their names.

    A replaced member's consumer stays registered after its entries were taken over, one more per
    restart for the whole run. One that still holds entries stays until a survivor takes them over:
    XGROUP DELCONSUMER would drop their pending records, and with them any redelivery.
    """
    key = broker.key("stream", stream)
    try:
        removed = broker.client.eval(_DELETE_IDLE_CONSUMERS_LUA, 1, key, group, *sorted(keep))
    except redis.ResponseError as exc:
        if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
            return []
        raise
    return [name.decode() if isinstance(name, bytes) else str(name) for name in removed]


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def trim_acknowledged(broker: Broker, stream: str) -> int:
    """Delete the entries every consumer group of `stream` has been given and acknowledged.

    Keeps each group's pending entries (a dead consumer's included, so they can be reclaimed) and
    everything not yet delivered; returns how many entries were removed. A stream without groups
    is left alone.
    """
    key = broker.key("stream", stream)
    try:
        groups = broker.client.xinfo_groups(key)
    except redis.ResponseError:
        return 0  # no such stream yet
    if not groups:
        return 0
    keep_from: list[str] = []
    for group in groups:
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        last = group["last-delivered-id"]
        keep_from.append(last.decode() if isinstance(last, bytes) else last)
        if int(group["pending"]):
            # A consumer may acknowledge its last entries between the two calls: then none is pending
            # (min is None) and the last delivered id alone bounds what may go.
            oldest = broker.client.xpending(key, name)["min"]
            if oldest is not None:
                keep_from.append(oldest.decode() if isinstance(oldest, bytes) else oldest)
    return int(broker.client.xtrim(key, minid=min(keep_from, key=_id_key), approximate=False))
