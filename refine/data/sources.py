"""What a document source is: its settings and how bad input in it is handled.

`DataConfig` holds where documents come from and how they are filtered, with the format names a config may give.
Bad input raises a `DataSourceError` naming the source and what is wrong; a malformed or undecodable record goes
through one `BadRowPolicy`: it raises `BadRowError` naming the file and row, or, with `skip_bad_rows`, is logged
with its location, counted and skipped. Never silently. `require_text` applies it to a value that must be text.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

SourceFormat = Literal["parquet", "jsonl", "text", "hf"]
FormatName = Literal["auto", "parquet", "jsonl", "text", "hf"]  # what a config may name; auto: detect_format
# The most windows a document may be split into. The data cursor is record index x max_windows + window,
# and this keeps it an int64 (checkpoints, stream messages) for sources of up to 2^43 records.
MAX_WINDOWS = 1 << 20


class DataSourceError(ValueError):
    """Bad data input; the message names the source and what is wrong."""


class EmptySourceError(DataSourceError):
    pass


class MissingColumnError(DataSourceError):
    def __init__(self, column: str, present: list[str], where: str) -> None:
        self.column, self.present, self.where = column, list(present), where
        super().__init__(f"column {column!r} not found in {where}; columns present: {self.present}")


class BadRowError(DataSourceError):
    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        super().__init__(f"{location}: {reason} (--set data.skip_bad_rows=true skips and counts such rows)")


def check_min_length(value: int, field: str) -> int:
    """`value`, a minimum document length named `field`, or a ValueError: a document of one token (an empty
    text's BOS) has nothing to predict, and training would fail on it far from the setting."""
    if value < 2:
        raise ValueError(f"{field}={value} keeps documents with nothing to train on: next-token prediction needs "
                         f"at least 2 tokens (one to predict from, one to predict), so {field} must be >= 2")
    return value


class DataConfig(BaseModel):
    """Where documents come from and how they are filtered."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    format: FormatName = "auto"
    text_column: str = Field("text", min_length=1)
    # Length bounds are in tokens, BOS / EOS included: what the model sees.
    min_length: int = 2
    max_length: int | None = Field(None, ge=1)
    # A document longer than max_length becomes up to this many windows of max_length tokens (the last one
    # kept if it has min_length tokens); what is past them is cut. 1: the first window only.
    max_windows: int = Field(1, ge=1, le=MAX_WINDOWS)
    add_bos: bool = True
    add_eos: bool = False
    skip_bad_rows: bool = False
    # Read at most this many records (before filtering): keeps the cursor meaning fixed.
    limit: int | None = Field(None, ge=1)
    # None: records in the source's order; else in a random order drawn from this seed (RowSource.shuffled_rows).
    shuffle_seed: int | None = Field(None, ge=0)
    # For a saved DatasetDict; None picks "train", or the only split.
    split: str | None = None
    tokenize_batch_size: int = Field(64, ge=1)
    show_progress: bool = True

    @field_validator("min_length")
    @classmethod
    def _trainable_length(cls, value: int) -> int:
        return check_min_length(value, "min_length")

    @model_validator(mode="after")
    def _check_bounds(self) -> "DataConfig":
        if self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) is larger than max_length ({self.max_length})")
        if self.max_windows > 1 and self.max_length is None:
            raise ValueError(f"max_windows={self.max_windows} needs a max_length: windows are max_length tokens")
        return self


class BadRowPolicy:
    """Raise on a bad row, or log it with its location and count it."""

    def __init__(self, skip_bad_rows: bool) -> None:
        self.skip_bad_rows = skip_bad_rows
        self.count = 0

    def reject(self, location: str, reason: str) -> None:
        if not self.skip_bad_rows:
            raise BadRowError(location, reason)
        self.count += 1
        logger.warning("skipping bad row %s: %s", location, reason)


# A JSON escape such as "\ud800" decodes to a lone surrogate, which no tokenizer can encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def require_text(value: Any, column: str, location: str, policy: BadRowPolicy) -> str | None:
    """The column's value as str, or None after the policy rejected it (null, bytes that are not UTF-8, ...)."""
    if isinstance(value, str):
        surrogate = _SURROGATE.search(value)  # a search, not an encoded copy of a text of hundreds of megabytes
        if surrogate is not None:
            policy.reject(location, f"column {column!r} holds a lone surrogate {surrogate.group()!r} "
                                    f"at character {surrogate.start()}, not encodable as UTF-8")
            return None
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            policy.reject(location, f"column {column!r} holds undecodable UTF-8 at byte {error.start}")
            return None
    kind = "null" if value is None else type(value).__name__
    policy.reject(location, f"column {column!r} must hold text, got {kind}: {value!r:.80}")
    return None
