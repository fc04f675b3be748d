"""Messages that flow between roles: documents -> rollouts -> scored rollouts.

Every message carries its own id (the learner's exactly-once guard keys on it, not on the stream
entry id, so a republished message is still recognised). Tensor fields hold torch tensors and are
checked for kind (int / float / bool) and rank here; cross-field shapes are checked by each model.

Rollout layout: a batch of B documents with c selected positions each and n samples per position
has N = B * c * n rollouts; rollout row r = (b * c + j) * n + s for document b, chunk j, sample s.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

__all__ = [
    "DataCursor",
    "DocumentBatch",
    "Message",
    "MessageId",
    "RolloutBatch",
    "ScoredBatch",
    "TensorField",
    "TensorSpec",
    "new_message_id",
]

TensorKind = Literal["any", "int", "float", "bool"]

# uint16/32/64 are left out: torch has no min/max (nor most arithmetic) for them.
_INT_DTYPES = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}


@dataclass(frozen=True)
class TensorSpec:
    """Pydantic metadata for a torch tensor field: accepted kind and number of dimensions."""

    kind: TensorKind = "any"
    ndim: int | None = None

    def validate(self, value: Any) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "fiub":
                raise ValueError(f"numpy dtype {value.dtype} cannot be a tensor")
            if not value.dtype.isnative:
                value = value.astype(value.dtype.newbyteorder("="))
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"expected a torch tensor, got {type(value).__name__}")
        if self.kind == "int" and value.dtype not in _INT_DTYPES:
            raise ValueError(f"expected an integer tensor, got dtype {value.dtype}")
        if self.kind == "float" and not value.is_floating_point():
            raise ValueError(f"expected a floating-point tensor, got dtype {value.dtype}")
        if self.kind == "bool" and value.dtype != torch.bool:
            raise ValueError(f"expected a bool tensor, got dtype {value.dtype}")
        if self.ndim is not None and value.dim() != self.ndim:
            raise ValueError(f"expected {self.ndim} dimensions, got shape {list(value.shape)}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda tensor: tensor.tolist(), when_used="json"
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        rank = f"{self.ndim}-d " if self.ndim is not None else ""
        return {"type": "array", "description": f"{rank}{self.kind} tensor (nested lists in JSON)"}


def TensorField(kind: TensorKind = "any", ndim: int | None = None) -> Any:
    """Annotated torch.Tensor type for message fields, e.g. `token_ids: TensorField("int", 2)`."""
    return Annotated[torch.Tensor, TensorSpec(kind=kind, ndim=ndim)]


def new_message_id() -> str:
    return uuid.uuid4().hex


MessageId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._:/@-]+$")]


class Message(BaseModel):
    """Base of every message: unknown fields are an error, not silently dropped, and a value of another type is
    refused, not converted (strict: "7" or True is no policy version; only a role's bug sends one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Strict: a lax float would take True, "5", NaN or inf, and a negative or non-finite time
    # breaks every age computed from it.
    created_at: float = Field(
        default_factory=time.time, strict=True, ge=0, allow_inf_nan=False,
        description="Unix time the producer built it",
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class DataCursor(BaseModel):
    """Where the orchestrator's data reader stands, so a resumed run continues after this batch."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(default=0, ge=0, description="times the data stream restarted its pass over the source, "
                       "through this batch (the offset counts within the pass, or with data.shuffle on across "
                       "passes)")
    offset: int = Field(default=0, ge=0, description="the data stream's cursor after this batch: for a file "
                        "source, record position x data.max_windows + windows of it used, after its last document "
                        "(bad and filtered records count too; the position is the record index, or with "
                        "data.shuffle its place in the pass's order plus passes x records); for the synthetic "
                        "corpus, the next document's index")
    source: str = Field(default="", description="dataset or shard the offset counts in")


class DocumentBatch(Message):
    """B tokenized documents, right-padded to T; lengths[b] tokens of row b are real."""

    batch_id: MessageId = Field(default_factory=new_message_id)
    doc_ids: list[Annotated[str, Field(min_length=1, max_length=1024)]]
    token_ids: TensorField("int", 2)  # [B, T]
    lengths: TensorField("int", 1)  # [B]
    cursor: DataCursor = Field(default_factory=DataCursor)

    @model_validator(mode="after")
    def _check_shapes(self) -> "DocumentBatch":
        batch, width = self.token_ids.shape
        _require(batch > 0, f"token_ids: a batch needs at least one document, got shape {[batch, width]}")
        _require(
            len(self.doc_ids) == batch,
            f"doc_ids: {len(self.doc_ids)} ids for token_ids of {batch} rows (shape {[batch, width]})",
        )
        _require(
            tuple(self.lengths.shape) == (batch,),
            f"lengths: shape {list(self.lengths.shape)}, expected [{batch}] to match token_ids",
        )
        if self.lengths.numel():
            low, high = int(self.lengths.min()), int(self.lengths.max())
            _require(1 <= low and high <= width, f"lengths: values must be in 1..{width}, got {low}..{high}")
        if self.token_ids.numel():
            _require(int(self.token_ids.min()) >= 0, f"token_ids: negative token id {int(self.token_ids.min())}")
        return self

    @property
    def batch_size(self) -> int:
        return int(self.token_ids.shape[0])

    def vocabulary_misfit(self, vocab_size: int) -> str | None:
        """Why a model of `vocab_size` token ids cannot read these documents (the first id at or past it, the
        padding included: it is embedded too), naming the field and value; None if every id fits."""
        if not self.token_ids.numel() or int(self.token_ids.max()) < vocab_size:  # one host read when they fit
            return None
        doc, index = (self.token_ids >= vocab_size).nonzero()[0].tolist()
        return (f"token_ids[{doc}, {index}]={int(self.token_ids[doc, index])} is not below "
                f"model.vocab_size={vocab_size}")


class RolloutBatch(Message):
    """Continuations sampled from c positions of each of B documents, n samples of k tokens each."""

    rollout_batch_id: MessageId = Field(default_factory=new_message_id)
    document_batch_id: MessageId
    policy_version: int = Field(ge=0)
    worker_id: Annotated[str, Field(min_length=1, max_length=256)]
    num_samples: int = Field(ge=1, description="n: samples per selected position")
    rollout_len: int = Field(ge=1, description="k: tokens per rollout")
    positions: TensorField("int", 2)  # [B, c] prefix ends (rollout starts) per document
    entropies: TensorField("float", 2)  # [B, c] smoothed entropy at the selected positions
    rollout_tokens: TensorField("int", 2)  # [N, k]
    behaviour_logprobs: TensorField("float", 2)  # [N, k] log-probs under the sampling policy
    rollout_hidden: TensorField("float", 3) | None = None  # [N, k, D]
    ground_truth_hidden: TensorField("float", 3) | None = None  # [N, k, D]
    ground_truth_tokens: TensorField("int", 2) | None = None  # [N, k] the document's own continuation

    @model_validator(mode="after")
    def _check_shapes(self) -> "RolloutBatch":
        batch, chunks = self.positions.shape
        n, k = self.num_samples, self.rollout_len
        rows = batch * chunks * n
        # An empty batch has no advantage groups: the learner's update would fail on it, not drop it.
        _require(
            batch >= 1 and chunks >= 1,
            f"positions: shape {[batch, chunks]}, a rollout batch needs at least one document and one position each",
        )
        _require(
            tuple(self.entropies.shape) == (batch, chunks),
            f"entropies: shape {list(self.entropies.shape)}, expected [{batch}, {chunks}] like positions",
        )
        expected = (rows, k)
        _require(
            tuple(self.rollout_tokens.shape) == expected,
            f"rollout_tokens: shape {list(self.rollout_tokens.shape)}, expected [{rows}, {k}] "
            f"(B={batch} x c={chunks} x n={n} rollouts of k={k} tokens)",
        )
        _require(
            tuple(self.behaviour_logprobs.shape) == expected,
            f"behaviour_logprobs: shape {list(self.behaviour_logprobs.shape)}, expected [{rows}, {k}]",
        )
        if self.ground_truth_tokens is not None:
            _require(
                tuple(self.ground_truth_tokens.shape) == expected,
                f"ground_truth_tokens: shape {list(self.ground_truth_tokens.shape)}, expected [{rows}, {k}]",
            )
        hidden_sizes = set()
        for name in ("rollout_hidden", "ground_truth_hidden"):
            hidden = getattr(self, name)
            if hidden is None:
                continue
            _require(
                tuple(hidden.shape[:2]) == expected,
                f"{name}: shape {list(hidden.shape)}, expected [{rows}, {k}, D]",
            )
            hidden_sizes.add(int(hidden.shape[2]))
        _require(
            len(hidden_sizes) <= 1,
            f"rollout_hidden and ground_truth_hidden disagree on the hidden size: {sorted(hidden_sizes)}",
        )
        if self.positions.numel():
            first = int(self.positions.min())
            _require(first >= 1, f"positions: a rollout starts after at least one token of its document, got {first}")
        for name in ("rollout_tokens", "ground_truth_tokens"):
            tokens = getattr(self, name)
            if tokens is not None and tokens.numel():
                low = int(tokens.min())
                _require(low >= 0, f"{name}: negative token id {low}")
        if self.behaviour_logprobs.numel():
            # A positive (or NaN, or infinite) log-prob is no probability: its importance ratio in the loss
            # would be wrong or not finite. One pass, one host read when they are fine.
            fine = torch.isfinite(self.behaviour_logprobs) & (self.behaviour_logprobs <= 0)
            if not bool(fine.all()):
                row, index = (~fine).nonzero()[0].tolist()
                value = float(self.behaviour_logprobs[row, index])
                raise ValueError(f"behaviour_logprobs: a log-probability is finite and <= 0, got {value} "
                                 f"at [{row}, {index}]")
        return self

    @property
    def batch_size(self) -> int:
        """B: documents in the source batch."""
        return int(self.positions.shape[0])

    @property
    def num_chunks(self) -> int:
        """c: positions selected per document."""
        return int(self.positions.shape[1])

    @property
    def num_rollouts(self) -> int:
        """N = B * c * n."""
        return int(self.rollout_tokens.shape[0])

    def rollout_index(self, doc: int, chunk: int, sample: int) -> int:
        """Row of (document b, chunk j, sample s) in the [N, ...] tensors."""
        return (doc * self.num_chunks + chunk) * self.num_samples + sample


class ScoredBatch(RolloutBatch):
    """A rollout batch with one scalar reward per rollout."""

    rewards: TensorField("float", 1)  # [N]
    reward_type: Annotated[str, Field(min_length=1, max_length=128)]

    @model_validator(mode="after")
    def _check_rewards(self) -> "ScoredBatch":
        _require(
            tuple(self.rewards.shape) == (self.num_rollouts,),
            f"rewards: shape {list(self.rewards.shape)}, expected [{self.num_rollouts}] (one per rollout)",
        )
        return self

    @classmethod
    def from_rollouts(cls, batch: RolloutBatch, rewards: torch.Tensor, reward_type: str) -> "ScoredBatch":
        fields = {name: getattr(batch, name) for name in RolloutBatch.model_fields}
        return cls(**fields, rewards=rewards, reward_type=reward_type)
