"""One-line reports of pydantic validation errors, shared by configs, checkpoints and wire messages; the check of a
library argument's type or count."""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import ValidationError

__all__ = ["NonFiniteOutputError", "check_argument_type", "check_whole_number", "shown", "validation_problems"]


class NonFiniteOutputError(ValueError):
    """A model's logits (or the entropies made of them) hold NaN or Inf. A training step treats it as a non-finite
    loss: skipped and counted (refine.step), where the library calls that meet it raise."""


def check_argument_type(value: Any, kind: type, name: str) -> None:
    """Refuse a library argument of another type, naming it: a RunConfig where a RefineConfig is taken (or the
    reverse) failed deep inside on a missing attribute."""
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")


def check_whole_number(value: object, name: str, minimum: int | None = None) -> None:
    """Refuse a library caller's count or seed that is not a whole number, or is below `minimum`: range() raises a
    TypeError for 2.5 naming no argument, and True counts as 1 (the CLI and the configs parse ints themselves)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


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


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr: a few items of each container, a few levels deep, long strings and numbers cut in
    the middle. Its cost depends on those limits alone, never on the size of the value: a YAML document whose
    aliases share one list at many places is small in memory, but its full repr would spell out every copy."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 6
        self.maxarray = 6
        self.maxstring = self.maxother = max(limit, 8)
        self.maxlong = 40

    def repr_instance(self, x: Any, level: int) -> str:
        if isinstance(x, torch.Tensor):  # its own repr prints every element (up to torch's summary threshold)
            return f"tensor of shape {list(x.shape)} {x.dtype}"
        return super().repr_instance(x, level)


def shown(value: Any, limit: int = 80) -> str:
    """A short one-line picture of a value: tensors by shape and dtype, mappings as {...}, long reprs cut.

    Bounded in time and memory whatever the value (a bounded `reprlib` repr, never the full one), so that
    an error message about a huge or alias-expanded input costs no more than one about a small one."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {list(value.shape)} {value.dtype}"
    if isinstance(value, dict):
        return "{...}"
    text = " ".join(_ShortRepr(limit).repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
