"""Wire codec: exact round trips for every dtype, and rejection of anything that is not a message."""

import math
import pickle
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict

from services.codec import (
    SUPPORTED_DTYPES,
    TENSOR_EXT_CODE,
    WIRE_VERSION,
    CodecError,
    CodecLimits,
    decode,
    encode,
)
from services.messages import TensorField


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    values: TensorField()
    maybe: TensorField("float") | None = None
    counts: dict[str, int] = {}
    tags: list[str] = []


class Inner(BaseModel):
    weights: TensorField("float")
    step: int


class Outer(BaseModel):
    label: str
    parts: list[Inner]
    score: float | None = None
    blob: bytes = b""


def _tensor_of(dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(3, 4, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(3, 4, generator=generator) * 100).to(dtype)
    info = torch.iinfo(dtype)
    # Include the extremes: a codec that goes through float or a narrower type would corrupt them.
    values = torch.randint(0, 100, (3, 4), generator=generator).to(dtype)
    values[0, 0] = info.min
    if dtype == torch.uint64:
        values.view(torch.int64)[0, 1] = -1  # all bits set; Python ints above 2**63 do not convert
    else:
        values[0, 1] = info.max
    return values


def _envelope(body: dict, type_name: str = "Sample") -> bytes:
    return msgpack.packb({"type": type_name, "v": WIRE_VERSION, "body": body}, use_bin_type=True)


def _tensor_ext(dtype: object, shape: object, data: object) -> msgpack.ExtType:
    return msgpack.ExtType(TENSOR_EXT_CODE, msgpack.packb([dtype, shape, data], use_bin_type=True))


@pytest.mark.parametrize("dtype_name", sorted(SUPPORTED_DTYPES))
def test_every_dtype_round_trips_bit_exact(dtype_name: str) -> None:
    dtype = SUPPORTED_DTYPES[dtype_name]
    tensor = _tensor_of(dtype)
    decoded = decode(encode(Sample(name="x", values=tensor)), Sample)
    assert decoded.values.dtype == dtype
    assert decoded.values.shape == tensor.shape
    # Compare raw bytes: equality of values would hide e.g. a lost sign of zero or a rounded bfloat16.
    assert decoded.values.view(torch.uint8).reshape(-1).tolist() == tensor.view(torch.uint8).reshape(-1).tolist()


def test_bfloat16_keeps_values_float32_cannot_distinguish_from_float16() -> None:
    # 1 + 2**-7 is representable in bfloat16 (7 mantissa bits), 3e38 overflows float16.
    tensor = torch.tensor([1 + 2**-7, 3e38, -0.0, 1e-30], dtype=torch.bfloat16)
    decoded = decode(encode(Sample(name="bf", values=tensor)), Sample).values
    assert decoded.dtype == torch.bfloat16
    assert torch.equal(decoded.view(torch.int16), tensor.view(torch.int16))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_])
def test_numpy_arrays_decode_as_equal_torch_tensors(dtype: type) -> None:
    array = (np.arange(12).reshape(3, 4) % 7).astype(dtype)
    decoded = decode(encode(Sample(name="np", values=array)), Sample).values
    assert isinstance(decoded, torch.Tensor)
    np.testing.assert_array_equal(decoded.numpy(), array)
    assert decoded.numpy().dtype == array.dtype


def test_big_endian_numpy_array_is_sent_by_value() -> None:
    array = np.arange(5, dtype=">i4")
    decoded = decode(encode(Sample(name="be", values=array)), Sample).values
    assert decoded.tolist() == [0, 1, 2, 3, 4]


def test_non_contiguous_grad_and_edge_shapes_round_trip() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for tensor in (
        base.t(),  # non-contiguous
        base[:, ::2],  # strided view
        base.clone().requires_grad_(True),
        torch.tensor(3.25),  # 0-d
        torch.zeros(0, 7),  # empty
    ):
        decoded = decode(encode(Sample(name="e", values=tensor)), Sample).values
        assert decoded.shape == tensor.shape
        assert torch.equal(decoded, tensor.detach())
        assert not decoded.requires_grad


def test_decoded_tensor_owns_writable_memory() -> None:
    data = encode(Sample(name="w", values=torch.ones(4)))
    decoded = decode(data, Sample).values
    decoded += 1  # would fail or corrupt the buffer if the tensor aliased the message bytes
    assert decoded.tolist() == [2.0] * 4
    assert torch.equal(decode(data, Sample).values, torch.ones(4))


def test_nested_models_lists_and_scalars_round_trip() -> None:
    message = Outer(
        label="nested",
        parts=[Inner(weights=torch.randn(2, 2), step=1), Inner(weights=torch.randn(3), step=2)],
        score=None,
        blob=b"\x00\x01raw",
    )
    decoded = decode(encode(message), Outer)
    assert decoded.label == "nested" and decoded.score is None and decoded.blob == b"\x00\x01raw"
    assert [p.step for p in decoded.parts] == [1, 2]
    for got, want in zip(decoded.parts, message.parts):
        assert torch.equal(got.weights, want.weights)


def test_optional_tensor_and_maps_round_trip() -> None:
    message = Sample(name="m", values=torch.arange(3), maybe=torch.ones(2), counts={"a": 1, "b": -2}, tags=["x"])
    decoded = decode(encode(message), Sample)
    assert torch.equal(decoded.maybe, torch.ones(2))
    assert decoded.counts == {"a": 1, "b": -2} and decoded.tags == ["x"]


def test_integers_in_msgpack_range_round_trip_and_wider_ones_are_refused() -> None:
    """Without this, narrowing the integer check to int64 would refuse the uint64 values msgpack
    carries (a seed of 2**64 - 1 is valid in the config), and widening it would let msgpack fail
    with its own OverflowError instead of a CodecError naming the field."""
    for value in (2**64 - 1, 2**63, -(2**63)):
        message = Sample(name="n", values=torch.zeros(1), counts={"seed": value})
        assert decode(encode(message), Sample).counts == {"seed": value}
    for value in (2**64, -(2**63) - 1):
        with pytest.raises(CodecError, match=rf"field counts.seed: integer {value} does not fit in 64 bits"):
            encode(Sample(name="n", values=torch.zeros(1), counts={"seed": value}))


def test_pickle_payload_is_rejected_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit())
    # Sanity check of the exploit itself: unpickling it does create the file.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(CodecError):
            decode(pickle.dumps(Exploit(), protocol=protocol), Sample)
    assert not marker.exists()


def test_pickle_inside_a_bytes_field_stays_inert_bytes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob = pickle.dumps(Exploit())
    decoded = decode(encode(Outer(label="b", parts=[], blob=blob)), Outer)
    assert decoded.blob == blob
    assert not marker.exists()


def test_unknown_extension_type_is_rejected() -> None:
    data = _envelope({"name": "x", "values": msgpack.ExtType(42, b"\x00\x01")})
    with pytest.raises(CodecError, match="extension type 42"):
        decode(data, Sample)


def test_a_tensor_extension_msgpack_cannot_read_says_why() -> None:
    # msgpack's C extension raises FormatError for a reserved byte without a message of its own; its pure-Python
    # fallback (MSGPACK_PUREPYTHON=1, or a build without a compiler) says "Unknown header".
    data = _envelope({"name": "x", "values": msgpack.ExtType(TENSOR_EXT_CODE, b"\xc1")})
    with pytest.raises(CodecError, match=r"^payload is not a valid message \(FormatError: (malformed or truncated "
                                         r"msgpack data|Unknown header: 0xc1)\)$"):
        decode(data, Sample)


def test_unknown_dtype_names_field_and_value() -> None:
    data = _envelope({"name": "x", "values": _tensor_ext("object", [2], b"\x00" * 16)})
    with pytest.raises(CodecError, match=r"field values: unknown dtype 'object'"):
        decode(data, Sample)


def test_shape_bytes_mismatch_names_field() -> None:
    data = _envelope({"name": "x", "values": _tensor_ext("float32", [2, 3], b"\x00" * 20)})
    with pytest.raises(CodecError, match=r"field values: shape \[2, 3\] of float32 needs 24 bytes, got 20"):
        decode(data, Sample)


@pytest.mark.parametrize("shape", [[-1, 3], [True], "12", [1.5]])
def test_malformed_shapes_are_rejected(shape: object) -> None:
    data = _envelope({"name": "x", "values": _tensor_ext("uint8", shape, b"\x00" * 3)})
    with pytest.raises(CodecError, match="field values: shape must be"):
        decode(data, Sample)


def test_nan_and_inf_are_rejected_by_default_and_allowed_when_asked() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        tensor = torch.tensor([1.0, bad, 2.0])
        with pytest.raises(CodecError, match=r"field values: .*1 NaN/Inf"):
            encode(Sample(name="n", values=tensor))
        permissive = CodecLimits(check_finite=False)
        data = encode(Sample(name="n", values=tensor), permissive)
        with pytest.raises(CodecError, match="field values"):
            decode(data, Sample)
        decoded = decode(data, Sample, permissive).values
        assert decoded[1].item() == bad or (math.isnan(bad) and math.isnan(decoded[1].item()))


def test_nan_in_bfloat16_and_nested_field_is_named() -> None:
    message = Outer(label="n", parts=[Inner(weights=torch.ones(2), step=0), Inner(weights=torch.tensor([math.nan], dtype=torch.bfloat16), step=1)])
    with pytest.raises(CodecError, match=r"field parts\[1\]\.weights"):
        encode(message)


def test_oversized_payloads_are_rejected_on_both_sides() -> None:
    message = Sample(name="big", values=torch.zeros(10_000))
    data = encode(message)
    small = CodecLimits(max_message_bytes=1000)
    with pytest.raises(CodecError, match=rf"message Sample is {len(data)} bytes, over the limit max_message_bytes=1000"):
        encode(message, small)
    with pytest.raises(CodecError, match=rf"payload is {len(data)} bytes, over the limit max_message_bytes=1000"):
        decode(data, Sample, small)


def test_tensor_element_limit_is_enforced_on_both_sides() -> None:
    message = Sample(name="big", values=torch.zeros(3, 50))
    few = CodecLimits(max_tensor_elements=100)
    with pytest.raises(CodecError, match=r"field values: tensor of shape \[3, 50\] has 150 elements"):
        encode(message, few)
    with pytest.raises(CodecError, match=r"field values: tensor of shape \[3, 50\] has 150 elements"):
        decode(encode(message), Sample, few)
    # A forged header claiming a huge shape fails on the limit before any allocation.
    forged = _envelope({"name": "x", "values": _tensor_ext("float32", [2**40], b"")})
    with pytest.raises(CodecError, match="max_tensor_elements"):
        decode(forged, Sample)


def test_unsendable_values_name_the_field() -> None:
    class Loose(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        payload: object

    with pytest.raises(CodecError, match="field payload: cannot encode a value of type set"):
        encode(Loose(payload={1, 2}))
    with pytest.raises(CodecError, match=r"field payload.inner: cannot encode a value of type object"):
        encode(Loose(payload={"inner": object()}))
    with pytest.raises(CodecError, match="field payload: map keys must be strings"):
        encode(Loose(payload={1: "a"}))
    with pytest.raises(CodecError, match="unsupported numpy dtype object"):
        encode(Loose(payload=np.array([object()], dtype=object)))
    with pytest.raises(CodecError, match="unsupported dtype torch.complex64"):
        encode(Loose(payload=torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(CodecError, match="message must be a pydantic model"):
        encode({"name": "x"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data, pattern",
    [
        (b"", "not a valid message"),
        (b"\xc1", "not a valid message"),  # reserved msgpack byte
        (msgpack.packb([1, 2, 3]), "not a message envelope"),
        (msgpack.packb({"type": "Sample", "v": WIRE_VERSION}), "not a message envelope"),
        (msgpack.packb({"type": "Sample", "v": 99, "body": {}}), "unsupported wire version 99"),
        (msgpack.packb({"type": "Other", "v": WIRE_VERSION, "body": {}}), "holds a 'Other', expected 'Sample'"),
        (msgpack.packb({"type": "Sample", "v": WIRE_VERSION, "body": []}), "field body: expected a map"),
        (msgpack.packb({1: 2}), "not a valid message"),  # non-string map key
        (b"\xa3\xff\xfe\xfd", "not a valid message"),  # invalid UTF-8 string
    ],
)
def test_malformed_payloads_are_rejected(data: bytes, pattern: str) -> None:
    with pytest.raises(CodecError, match=pattern):
        decode(data, Sample)


def test_truncated_and_trailing_bytes_are_rejected() -> None:
    data = encode(Sample(name="t", values=torch.arange(100)))
    with pytest.raises(CodecError):
        decode(data[:-10], Sample)
    with pytest.raises(CodecError):
        decode(data + b"\x00", Sample)


def test_wrong_field_types_fail_validation_naming_the_field() -> None:
    data = _envelope({"name": 123, "values": _tensor_ext("int64", [1], b"\x00" * 8)})
    with pytest.raises(CodecError, match=r"not a valid Sample: name: Input should be a valid string \(got 123\)"):
        decode(data, Sample)
    data = _envelope({"name": "x", "values": [1, 2, 3]})
    with pytest.raises(CodecError, match=r"values: expected a torch tensor, got list$"):
        decode(data, Sample)
    data = _envelope({"name": "x", "values": _tensor_ext("int64", [1], b"\x00" * 8), "intruder": 1})
    with pytest.raises(CodecError, match="intruder"):
        decode(data, Sample)


def test_deeply_nested_payloads_are_rejected() -> None:
    nested: object = "x"
    for _ in range(40):
        nested = [nested]
    with pytest.raises(CodecError, match="nested deeper than 32 levels"):
        decode(_envelope({"name": nested, "values": _tensor_ext("uint8", [0], b"")}), Sample)
    # Deeper than msgpack itself allows: still a CodecError, not a crash.
    hostile = b"\x83\xa4type\xa6Sample\xa1v\x01\xa4body\x81\xa4name" + b"\x91" * 100_000 + b"\xa1x"
    with pytest.raises(CodecError, match="not a valid message"):
        decode(hostile, Sample)


def test_validation_errors_are_one_line_per_field_naming_the_value() -> None:
    """A dead-letter reason is one line: `field: message (got value)` per problem, tensors by shape; a check
    of our own names its value in its message."""
    data = _envelope({"name": ["a\nb"], "values": _tensor_ext("int64", [1], b"\x00" * 8),
                      "maybe": _tensor_ext("int64", [2, 2], b"\x00" * 32), "tags": "x" * 500})
    with pytest.raises(CodecError) as info:
        decode(data, Sample)
    text = str(info.value)
    assert "\n" not in text
    assert "name: Input should be a valid string (got ['a\\nb'])" in text
    assert "maybe: expected a floating-point tensor, got dtype torch.int64;" in text
    assert "tags: Input should be a valid list (got 'xxx" in text and "x" * 100 not in text


@pytest.mark.parametrize("shape", [[0, 2**31, 2**31, 2**31], [0, 2**63], [2**63, 0], [0, 2**40]])
def test_zero_element_tensor_with_a_huge_dimension_is_a_codec_error(shape: list[int]) -> None:
    # math.prod is 0, so only a per-dimension check stops torch overflowing on the strides.
    data = _envelope({"name": "x", "values": _tensor_ext("int64", shape, b"")})
    with pytest.raises(CodecError, match=rf"field values: shape .* has a dimension of {max(shape)}, over the limit"):
        decode(data, Sample)


def test_a_shape_torch_refuses_is_a_codec_error_naming_the_field() -> None:
    # Every dimension is within the element limit, yet the strides of the product overflow int64.
    shape = [0] + [2**26] * 31
    data = _envelope({"name": "x", "values": _tensor_ext("int64", shape, b"")})
    with pytest.raises(CodecError, match=r"field values: cannot build a int64 tensor of shape \[0, 67108864"):
        decode(data, Sample)


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_wire_version_must_be_the_integer_1(version: object) -> None:
    message = msgpack.unpackb(encode(Sample(name="v", values=torch.arange(3))), raw=False)
    data = msgpack.packb({**message, "v": version}, use_bin_type=True)
    with pytest.raises(CodecError, match=rf"field v: unsupported wire version {version!r}"):
        decode(data, Sample)
