"""Wire format between roles: msgpack with raw tensor bytes. Never pickle.

A message is a pydantic model. It is written as the msgpack map
`{"type": <class name>, "v": 1, "body": {<field>: <value>}}`; tensors (torch or numpy) become one
msgpack extension type (code 1) whose payload is `[dtype name, shape, little-endian bytes]`.
Decoding accepts nothing else: any other extension type, a wrong class name, a malformed tensor or
a payload over the size limits is rejected with an error naming the field and the value, and
nothing in the bytes can make the reader run code (msgpack builds only plain values here).
"""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refine.errors import validation_problems

__all__ = [
    "CodecError",
    "CodecLimits",
    "DEFAULT_LIMITS",
    "SUPPORTED_DTYPES",
    "TENSOR_EXT_CODE",
    "WIRE_VERSION",
    "decode",
    "decode_tensor",
    "dtype_name",
    "encode",
    "encode_tensor",
]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("services.codec writes raw little-endian tensor bytes; big-endian hosts are unsupported")

WIRE_VERSION = 1
TENSOR_EXT_CODE = 1
_MAX_NDIM = 32
# Messages are shallow; a deeply nested payload is an attack on the reader's stack.
_MAX_DEPTH = 32

# Wire name -> torch dtype. Names match torch's (and numpy's, where numpy has the type).
SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint64": torch.uint64,
    "uint32": torch.uint32,
    "uint16": torch.uint16,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_TORCH_TO_NAME = {dtype: name for name, dtype in SUPPORTED_DTYPES.items()}


class CodecError(ValueError):
    """A message could not be encoded or decoded; the text names the field and the value."""


class CodecLimits(BaseModel):
    """Bounds that keep one bad or hostile message from exhausting a consumer's memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Redis refuses values over 512 MB; stay well below.
    max_message_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_tensor_elements: int = Field(default=64 * 1024 * 1024, gt=0)
    # Reject NaN/Inf in floating tensors: a diverged producer should fail loudly, not poison training.
    check_finite: bool = True


DEFAULT_LIMITS = CodecLimits()

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class _WireTensor:
    """A tensor extension as read off the wire, before it is checked against its field."""

    dtype: Any
    shape: Any
    data: Any


# -- tensors ------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype | np.dtype) -> str:
    """Wire name of a torch or numpy dtype; raises CodecError for unsupported ones."""
    if isinstance(dtype, torch.dtype):
        name = _TORCH_TO_NAME.get(dtype)
    else:
        name = np.dtype(dtype).name if np.dtype(dtype).name in SUPPORTED_DTYPES else None
    if name is None:
        raise CodecError(f"unsupported dtype {dtype} (supported: {', '.join(SUPPORTED_DTYPES)})")
    return name


def _check_tensor(
    field: str, tensor: torch.Tensor, limits: CodecLimits
) -> None:
    if tensor.numel() > limits.max_tensor_elements:
        raise CodecError(
            f"field {field}: tensor of shape {list(tensor.shape)} has {tensor.numel()} elements, "
            f"over the limit max_tensor_elements={limits.max_tensor_elements}"
        )
    if limits.check_finite and tensor.is_floating_point() and tensor.numel() > 0:
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise CodecError(
                f"field {field}: tensor of shape {list(tensor.shape)} contains {bad} NaN/Inf "
                f"value(s) (CodecLimits.check_finite is on)"
            )


def encode_tensor(
    value: torch.Tensor | np.ndarray, field: str = "tensor", limits: CodecLimits = DEFAULT_LIMITS
) -> msgpack.ExtType:
    """One tensor as the wire extension type (dtype name, shape, raw little-endian bytes)."""
    if isinstance(value, np.ndarray):
        if value.dtype.byteorder == ">":
            value = value.astype(value.dtype.newbyteorder("<"))
        if value.dtype.name not in SUPPORTED_DTYPES or value.dtype.kind not in "fiub":
            raise CodecError(
                f"field {field}: unsupported numpy dtype {value.dtype} "
                f"(supported: {', '.join(SUPPORTED_DTYPES)})"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, torch.Tensor):
        tensor = value
    else:
        raise CodecError(f"field {field}: expected a torch tensor or numpy array, got {type(value).__name__}")
    if tensor.dtype not in _TORCH_TO_NAME:
        raise CodecError(
            f"field {field}: unsupported dtype {tensor.dtype} (supported: {', '.join(SUPPORTED_DTYPES)})"
        )
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise CodecError(f"field {field}: only dense tensors can be sent, got layout {tensor.layout}")
    tensor = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    _check_tensor(field, tensor, limits)
    # Viewing as bytes works for every dtype, bfloat16 included (numpy has no bfloat16).
    raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    payload = msgpack.packb([_TORCH_TO_NAME[tensor.dtype], list(tensor.shape), raw], use_bin_type=True)
    return msgpack.ExtType(TENSOR_EXT_CODE, payload)


def decode_tensor(wire: _WireTensor, field: str, limits: CodecLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Check a tensor read off the wire and build it (always a fresh, writable CPU tensor)."""
    if not isinstance(wire.dtype, str) or wire.dtype not in SUPPORTED_DTYPES:
        raise CodecError(
            f"field {field}: unknown dtype {wire.dtype!r} (supported: {', '.join(SUPPORTED_DTYPES)})"
        )
    shape = wire.shape
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise CodecError(
            f"field {field}: shape must be a list of at most {_MAX_NDIM} non-negative integers, got {shape!r}"
        )
    if not isinstance(wire.data, bytes):
        raise CodecError(f"field {field}: tensor data must be bytes, got {type(wire.data).__name__}")
    # Checked per dimension too: a zero anywhere makes the product 0, and torch still refuses (outside
    # CodecError) to build a tensor whose strides overflow, e.g. shape [0, 2**63].
    big = next((d for d in shape if d > limits.max_tensor_elements), None)
    if big is not None:
        raise CodecError(
            f"field {field}: shape {shape} has a dimension of {big}, "
            f"over the limit max_tensor_elements={limits.max_tensor_elements}"
        )
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise CodecError(
            f"field {field}: tensor of shape {shape} has {numel} elements, "
            f"over the limit max_tensor_elements={limits.max_tensor_elements}"
        )
    dtype = SUPPORTED_DTYPES[wire.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(wire.data) != numel * itemsize:
        raise CodecError(
            f"field {field}: shape {shape} of {wire.dtype} needs {numel * itemsize} bytes, "
            f"got {len(wire.data)}"
        )
    try:
        if numel == 0:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            # bytearray copies: the tensor owns writable memory independent of the message buffer.
            tensor = torch.frombuffer(bytearray(wire.data), dtype=dtype).reshape(shape)
    except Exception as exc:  # torch refusing a shape the checks above let through
        raise CodecError(
            f"field {field}: cannot build a {wire.dtype} tensor of shape {shape} ({type(exc).__name__}: {exc})"
        ) from exc
    _check_tensor(field, tensor, limits)
    return tensor


# -- messages -----------------------------------------------------------------------------------


def _to_wire(value: Any, field: str, limits: CodecLimits, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise CodecError(f"field {field}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise CodecError(f"field {field}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return encode_tensor(value, field, limits)
    if isinstance(value, np.generic) and value.dtype.kind in "fiub":
        return value.item()
    if isinstance(value, enum.Enum):
        return _to_wire(value.value, field, limits, depth + 1)
    if isinstance(value, BaseModel):
        return {
            name: _to_wire(getattr(value, name), f"{field}.{name}", limits, depth + 1)
            for name in type(value).model_fields
        }
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(f"field {field}: map keys must be strings, got {type(key).__name__} {key!r}")
            out[key] = _to_wire(item, f"{field}.{key}", limits, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_wire(item, f"{field}[{i}]", limits, depth + 1) for i, item in enumerate(value)]
    raise CodecError(f"field {field}: cannot encode a value of type {type(value).__name__}")


def _from_wire(value: Any, field: str, limits: CodecLimits, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise CodecError(f"field {field}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, _WireTensor):
        return decode_tensor(value, field, limits)
    if isinstance(value, dict):
        return {key: _from_wire(item, f"{field}.{key}", limits, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_wire(item, f"{field}[{i}]", limits, depth + 1) for i, item in enumerate(value)]
    raise CodecError(f"field {field}: unsupported wire value of type {type(value).__name__}")


def encode(message: BaseModel, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Serialize a pydantic message; raises CodecError naming the field for anything unsendable."""
    if not isinstance(message, BaseModel):
        raise CodecError(f"message must be a pydantic model, got {type(message).__name__}")
    name = type(message).__name__
    body = {
        field: _to_wire(getattr(message, field), field, limits) for field in type(message).model_fields
    }
    try:
        data = msgpack.packb({"type": name, "v": WIRE_VERSION, "body": body}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"message {name} could not be packed: {exc}") from exc
    if len(data) > limits.max_message_bytes:
        raise CodecError(
            f"message {name} is {len(data)} bytes, over the limit max_message_bytes={limits.max_message_bytes}"
        )
    return data


def _unpack(data: bytes, limits: CodecLimits) -> Any:
    def ext_hook(code: int, payload: bytes) -> _WireTensor:
        if code != TENSOR_EXT_CODE:
            raise CodecError(
                f"msgpack extension type {code} is not allowed (only tensors, code {TENSOR_EXT_CODE})"
            )
        parts = msgpack.unpackb(
            payload, raw=False, use_list=True, strict_map_key=True,
            ext_hook=_reject_nested_ext, max_bin_len=len(payload), max_str_len=64,
            max_array_len=_MAX_NDIM + 3, max_map_len=0, max_ext_len=0,
        )
        if not isinstance(parts, list) or len(parts) != 3:
            raise CodecError("tensor extension must hold [dtype, shape, bytes]")
        return _WireTensor(*parts)

    size = len(data)
    return msgpack.unpackb(
        data, raw=False, use_list=True, strict_map_key=True, ext_hook=ext_hook,
        max_bin_len=size, max_str_len=size, max_array_len=size, max_map_len=size, max_ext_len=size,
    )


def _reject_nested_ext(code: int, payload: bytes) -> Any:
    raise CodecError(f"msgpack extension type {code} is not allowed inside a tensor")


def decode(data: bytes | bytearray | memoryview, cls: type[M], limits: CodecLimits = DEFAULT_LIMITS) -> M:
    """Parse bytes written by `encode` into `cls`; raises CodecError for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_message_bytes:
        raise CodecError(
            f"payload is {len(data)} bytes, over the limit max_message_bytes={limits.max_message_bytes}"
        )
    try:
        envelope = _unpack(data, limits)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several types for malformed input
        reason = str(exc) or "malformed or truncated msgpack data"  # msgpack's FormatError can say nothing
        raise CodecError(f"payload is not a valid message ({type(exc).__name__}: {reason})") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"type", "v", "body"}:
        shown = sorted(envelope) if isinstance(envelope, dict) else type(envelope).__name__
        raise CodecError(f"payload is not a message envelope {{type, v, body}}, got {shown}")
    version = envelope["v"]
    # Python's 1.0 == True == 1: only the integer 1 is version 1.
    if not isinstance(version, int) or isinstance(version, bool) or version != WIRE_VERSION:
        raise CodecError(f"field v: unsupported wire version {version!r} (this reader speaks {WIRE_VERSION})")
    if envelope["type"] != cls.__name__:
        raise CodecError(f"field type: payload holds a {envelope['type']!r}, expected {cls.__name__!r}")
    if not isinstance(envelope["body"], dict):
        raise CodecError(f"field body: expected a map, got {type(envelope['body']).__name__}")
    body = {}
    for key, value in envelope["body"].items():
        try:
            body[key] = _from_wire(value, key, limits)
        except CodecError:
            raise
        except Exception as exc:  # anything else a hostile value provokes must still be a CodecError
            raise CodecError(f"field {key}: cannot be decoded ({type(exc).__name__}: {exc})") from exc
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(validation_problems(exc, unnamed="message"))
        raise CodecError(f"payload is not a valid {cls.__name__}: {problems}") from exc
    except Exception as exc:  # a validator's own checks, or torch refusing an operation on odd input
        raise CodecError(f"payload is not a valid {cls.__name__}: {type(exc).__name__}: {exc}") from exc
