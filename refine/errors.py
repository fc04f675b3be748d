"""One-line reports of pydantic validation errors, shared by configs, checkpoints and wire messages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import ValidationError

__all__ = ["shown", "validation_problems"]


def validation_problems(errors: ValidationError | Iterable[Any], unnamed: str = "config") -> list[str]:
    """pydantic's multi-line report (the error, or some of its `errors()`) as one `field: message (got
    value)` line per problem, without its documentation links. Our own checks (value errors) name their fields and values themselves, so
    they keep just their message; `unnamed` stands in for the field of a problem located nowhere."""
    problems = []
    for e in errors.errors() if isinstance(errors, ValidationError) else errors:
        field = ".".join(str(part) for part in e["loc"])
        message = " ".join(str(e["msg"]).removeprefix("Value error, ").split())
        if e["type"] == "value_error":
            problems.append(f"{field}: {message}" if field else message)
        else:
            problems.append(f"{field or unnamed}: {message} (got {shown(e.get('input'))})")
    return problems


def shown(value: Any, limit: int = 80) -> str:
    """A short one-line picture of a value: tensors by shape and dtype, mappings as {...}, long reprs cut."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {list(value.shape)} {value.dtype}"
    if isinstance(value, dict):
        return "{...}"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
