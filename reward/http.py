"""HTTP API of the reward service: anyone can score completions with a registered reward.

    POST /v1/score      {reward_type, rollouts: [...], dtype} -> {reward_type, rewards, latency_ms}
    GET  /v1/rewards    registered reward types
    GET  /healthz       liveness
    GET  /metrics       Prometheus text
    GET  /openapi.json  the schema (also /docs)

Every error is a JSON body {"error": "<field>: <problem>", "detail": [{loc, field, msg, type}]}
with a 4xx status: 413 for a body over `max_body_bytes` (refused before it is read in full), 415 for
a body that is not JSON, 422 for a request that does not match the schema (the pydantic error
locations) or repeats a key in a JSON object, 400 when the reward cannot score well-formed rollouts
(a field it needs is missing) or for a request HTTP cannot parse (a bad Content-Length), 408 for a
body that takes over `max_body_seconds` to arrive. The request bodies being received or scored at
once are at most `max_inflight_bytes` (each byte of JSON takes up to ~40 bytes of memory parsed):
a request past it is answered 503 with Retry-After, from its Content-Length before its body is read.
Hidden states must be finite numbers (NaN / Infinity literals are refused), gold answers must hold
text (an empty one is a substring of everything), and every rollout of one request must give the
same fields with the same k and hidden size.

`dtype` ("float32", the default, or "float64") is the precision the hidden states are scored in. The
service's models run in float32 (or bfloat16, which float32 holds exactly), and the reward replicas
score those hidden states as they are: with the default, a request gives bit for bit the rewards a
replica gives the same rollouts. "float64" scores
the JSON numbers at full precision (rewards differ from float32 scoring by about 1e-8); a hidden value
beyond float32's range (|x| > 3.4e38) is refused with 422 unless the request says "float64", and so is
one that float32 cannot hold to its precision beside the largest value of its vector (1e-46 is 0 in
float32, 2e-45 becomes 1.4e-45: such vectors' cosines came out silently wrong).

No `from __future__ import annotations` here: FastAPI reads the request model from the endpoint's
annotations, and that model is built per app (its limits are part of the schema).
"""

import asyncio
import functools
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import h11
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

import reward.functions  # noqa: F401  (registers the task rewards)
from refine.algorithm.rewards import (
    MissingRewardInput, RewardInputs, RewardOutputError, available_rewards, compute_reward,
)
from refine.errors import shown
from reward.scoring import record_scored
from services.metrics import Metrics

__all__ = ["JSONErrorH11Protocol", "ScoreLimits", "ScoreResponse", "create_app", "serve"]

logger = logging.getLogger(__name__)

MAX_TOKEN_ID = 2**31 - 1
SCORE_PATH = "/v1/score"
_SEQUENCE_FIELDS = ("rollout_tokens", "ground_truth_tokens", "rollout_hidden", "ground_truth_hidden")
_ROLLOUT_FIELDS = (*_SEQUENCE_FIELDS, "rollout_text", "reference_texts")
_MAX_REPORTED_ERRORS = 20
# No object of the request has more than 6 keys; pydantic reports every unknown key as an error of its own, so
# one object of millions of keys took gigabytes to refuse.
_MAX_OBJECT_KEYS = 64
HiddenDtype = Literal["float32", "float64"]
_HIDDEN_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


class ScoreLimits(BaseModel):
    """What one request may hold, everything larger refused with a 4xx; what the requests in flight may hold
    together, more answered 503."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Upper bounds far past any use, so that the request schema built from them holds 64-bit integers (a flag
    # of 10**23 failed building it, with a traceback).
    max_batch: int = Field(1024, ge=1, le=2**20, description="rollouts per request")
    max_rollout_len: int = Field(1024, ge=1, le=2**16, description="k: tokens / hidden vectors per rollout")
    max_hidden_dim: int = Field(16384, ge=1, le=2**20, description="values per hidden vector")
    max_text_chars: int = Field(100_000, ge=1, le=2**30, description="characters per text")
    max_references: int = Field(64, ge=1, le=2**16, description="gold answers per rollout")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, le=2**31, description="request body size")
    # A parsed body takes up to ~40 times its size: the default holds about 2.5 GB at most.
    max_inflight_bytes: int = Field(64 * 2**20, ge=1024, le=2**36,
                                    description="request bodies received or scored at once, more is answered 503")
    max_body_seconds: int = Field(60, ge=1, le=86400, description="seconds a request body may take to arrive")

    @field_validator("max_inflight_bytes")
    @classmethod
    def _holds_one_body(cls, value: int, info: ValidationInfo) -> int:
        # Else a body that max_body_bytes allows would be answered 503, "retry later", for ever.
        body = info.data.get("max_body_bytes")
        if body is not None and value < body:
            raise ValueError(f"must be at least max_body_bytes ({body}), the size of one request")
        return value


class ScoreResponse(BaseModel):
    reward_type: str
    rewards: list[float] = Field(description="one reward per rollout, in request order")
    latency_ms: float = Field(description="time spent scoring, validation excluded")


class ErrorDetail(BaseModel):
    loc: list[str | int]
    field: str
    msg: str
    type: str


class ErrorResponse(BaseModel):
    error: str = Field(description="the first problems, as '<field>: <problem>'")
    detail: list[ErrorDetail] = Field(default_factory=list)


def _not_blank(answer: str) -> str:
    # An empty gold answer is a substring of every completion: it would score any rollout as right.
    if not answer.strip():
        raise ValueError(f"a gold answer must not be empty or whitespace only, got {answer!r:.40}")
    return answer


def _request_models(limits: ScoreLimits) -> type[BaseModel]:
    """The request schema with this app's limits built in (so they show in the OpenAPI schema)."""
    # fail_fast: a list reports its first bad item only. Pydantic reports each of them otherwise, and a body of
    # millions of bad numbers took ten gigabytes and minutes to refuse.
    token_id = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKEN_ID)]
    finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    tokens = Annotated[list[token_id], Field(min_length=1, max_length=limits.max_rollout_len, fail_fast=True)]
    vector = Annotated[list[finite], Field(min_length=1, max_length=limits.max_hidden_dim, fail_fast=True)]
    hidden = Annotated[list[vector], Field(min_length=1, max_length=limits.max_rollout_len, fail_fast=True)]
    text = Annotated[str, Field(strict=True, max_length=limits.max_text_chars)]
    answer = Annotated[text, AfterValidator(_not_blank)]
    references = Annotated[list[answer], Field(min_length=1, max_length=limits.max_references, fail_fast=True)]

    class Rollout(BaseModel):
        """One completion to score; which fields a reward needs depends on the reward."""

        model_config = ConfigDict(extra="forbid")

        rollout_tokens: tokens | None = Field(None, description="k sampled token ids (binary, hybrid)")
        ground_truth_tokens: tokens | None = Field(None, description="the k true continuation ids")
        rollout_hidden: hidden | None = Field(None, description="k final-layer hidden vectors (cosine, hybrid)")
        ground_truth_hidden: hidden | None = Field(None, description="k hidden vectors of the true continuation")
        rollout_text: text | None = Field(None, description="decoded completion (task rewards)")
        reference_texts: references | None = Field(None, description="acceptable answers (task rewards)")

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        reward_type: str = Field(min_length=1, max_length=128, strict=True, description="see GET /v1/rewards")
        rollouts: list[Rollout] = Field(min_length=1, max_length=limits.max_batch, fail_fast=True)
        dtype: HiddenDtype = Field(
            "float32", description="precision the hidden states are scored in: float32 (the default) scores as the "
                                   "reward replicas score float32 models, bit for bit; float64 at full precision")

        @field_validator("reward_type")
        @classmethod
        def _registered(cls, value: str) -> str:
            if value not in available_rewards():
                raise ValueError(f"unknown reward_type {value!r}; registered: {available_rewards()}")
            return value

    return ScoreRequest


# -- errors -------------------------------------------------------------------------------------------


def _field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if len(parts) > 1 and parts[0] == "body":
        if isinstance(parts[1], int):
            return "body"  # a character offset of invalid JSON, not a field
        parts = parts[1:]  # "body" is implied
    return ".".join(str(part) for part in parts) or "body"


def _error_content(details: list[dict[str, Any]]) -> dict[str, Any]:
    summary = "; ".join(f"{item['field']}: {item['msg']}" for item in details[:5])
    if len(details) > 5:
        summary += f"; and {len(details) - 5} more"
    return {"error": summary, "detail": details}


def _error_response(status: int, details: list[dict[str, Any]], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_content(details), status_code=status, headers=headers)


def _detail(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "field": _field_name(loc), "msg": msg, "type": kind}


def _validation_details(errors: list[Any]) -> list[dict[str, Any]]:
    details = []
    for error in errors[:_MAX_REPORTED_ERRORS]:
        loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
        # Our own checks' words without pydantic's "Value error, " prefix, as the CLI shows them.
        msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        kind = str(error.get("type", "value_error"))
        if kind == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            position = f" at character {loc[1]}" if len(loc) > 1 else ""
            msg = f"invalid JSON{position}: {reason}" if reason else f"invalid JSON{position}"
        elif "input" in error and kind != "missing":  # (a missing field's input is its parent object)
            value = shown(error["input"])
            # Our own checks' words name the value already ("got ..."); else as the CLI does.
            msg = msg if value in msg or "got " in msg else f"{msg} (got {value})"
        details.append(_detail(loc, msg, kind))
    if len(errors) > _MAX_REPORTED_ERRORS:
        details.append(_detail(["body"], f"{len(errors) - _MAX_REPORTED_ERRORS} more errors not shown", "too_many"))
    return details


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, _validation_details(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "error"
        loc = ["path"] if exc.status_code in (404, 405) else ["body"]
        detail = _detail(loc, f"{message} ({request.method} {request.url.path})", f"http_{exc.status_code}")
        return _error_response(exc.status_code, [detail], headers=getattr(exc, "headers", None))

    @app.exception_handler(_JSONRefused)
    async def _json_refused(_request: Request, exc: _JSONRefused) -> JSONResponse:
        return _error_response(exc.status_code, exc.details)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("reward service: unexpected error")
        # Starlette raises the exception again once this answer is sent, and uvicorn then drops the connection:
        # the client must not send its next request on it.
        return _error_response(500, [_detail(["server"], f"internal error ({type(exc).__name__})", "internal")],
                               headers={"Connection": "close"})


# -- request body guard ---------------------------------------------------------------------------------


_Refusal = tuple[int, list[dict[str, Any]]]  # (status, error details)


class _BodyGuard:
    """Refuses oversized and non-JSON bodies before the app parses anything, and bounds the bytes in flight.

    A body is read only up to `max_body_bytes` and never parsed here; what is accepted is handed on
    to the app unchanged. The bodies being received or handled by the app together stay within
    `max_inflight_bytes`: a request past it is answered 503 with Retry-After (from its Content-Length
    before any of its body is read; without one as soon as the bytes it sent pass it). Only bytes
    received count, so a client that declares a large body and sends nothing holds nothing. A body that
    takes over `max_body_seconds` to arrive is answered 408, so a stalled client cannot hold its bytes.
    Before answering a refusal, the rest of the body is read and discarded (up to `drain_bytes`),
    because closing a connection with unread data resets it and the client would lose the answer. A
    client that sent `Expect: 100-continue` is answered without sending its body.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_inflight_bytes: int, max_body_seconds: float,
                 json_paths: frozenset[str], drain_bytes: int = 64 * 2**20) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.max_body_seconds = max_body_seconds
        self.json_paths = json_paths
        self.drain_bytes = drain_bytes
        self.in_flight = 0  # bytes of the bodies received and not yet answered, all requests together

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal, declared = self._refuse_headers(scope, headers)
        if refusal is None and declared is not None and self.in_flight + declared > self.max_inflight_bytes:
            refusal = self._busy(f"its Content-Length {declared}", self.in_flight)
        chunks: list[bytes] = []
        held = 0  # this request's bytes counted in self.in_flight: given back on every way out
        ended = False  # the whole body has been received
        disconnected = False

        async def read_body() -> None:
            nonlocal held, ended, refusal, disconnected
            while not ended:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    return
                chunk = message.get("body", b"")
                chunks.append(chunk)
                held += len(chunk)
                self.in_flight += len(chunk)
                ended = not message.get("more_body", False)
                if held > self.max_body_bytes:
                    refusal = self._too_large(f"{held} bytes received so far")
                elif self.in_flight > self.max_inflight_bytes:
                    refusal = self._busy(f"its {held} bytes received so far", self.in_flight - held)
                if refusal is not None:
                    return

        try:
            if refusal is None:
                try:
                    # wait_for, not asyncio.timeout: the project supports Python 3.10.
                    await asyncio.wait_for(read_body(), self.max_body_seconds)
                except asyncio.TimeoutError:
                    refusal = 408, [_detail(["body"], f"request body not received within max_body_seconds "
                                                      f"({self.max_body_seconds}): {held} bytes came", "timeout")]
                if disconnected:
                    return
            if refusal is not None:
                chunks.clear()
                self.in_flight -= held
                held = 0
                await self._refuse(refusal, declared, ended, headers, scope, receive, send)
                return
            body = b"".join(chunks)
            chunks.clear()
            delivered = False

            async def replay() -> Message:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= held

    async def _refuse(self, refusal: _Refusal, declared: int | None, ended: bool, headers: Headers, scope: Scope,
                      receive: Receive, send: Send) -> None:
        status, details = refusal
        drained = ended
        wants_continue = headers.get("expect", "").lower() == "100-continue"
        may_drain = declared is None or declared <= self.max_body_bytes + self.drain_bytes
        # A client too slow to send its body is not waited for again.
        if not drained and not wants_continue and may_drain and status != 408:
            drained = await _drain(receive, self.drain_bytes)
        answer_headers = {"Retry-After": "1"} if status == 503 else {}
        if not drained:
            answer_headers["Connection"] = "close"  # an undrained connection cannot carry another request
        await _error_response(status, details, headers=answer_headers)(scope, receive, send)

    def _refuse_headers(self, scope: Scope, headers: Headers) -> tuple[_Refusal | None, int | None]:
        """(refusal as (status, details) or None, the declared Content-Length or None)."""
        declared = headers.get("content-length")
        length = int(declared) if declared is not None and declared.strip().isdigit() else None
        if scope["path"] in self.json_paths:
            content_type = headers.get("content-type")
            media_type = (content_type or "").split(";")[0].strip().lower()
            if media_type != "application/json" and not media_type.endswith("+json"):
                got = repr(content_type) if content_type is not None else "no Content-Type header"
                return (415, [_detail(["header", "content-type"], f"must be application/json, got {got}",
                                      "content_type")]), length
        if declared is not None and length is None:
            return (400, [_detail(["header", "content-length"], f"not a byte count: {declared!r}",
                                  "content_length")]), None
        if length is not None and length > self.max_body_bytes:
            return self._too_large(f"Content-Length is {length}"), length
        return None, length

    def _too_large(self, what: str) -> _Refusal:
        message = f"request body too large: {what}, max_body_bytes is {self.max_body_bytes}"
        return 413, [_detail(["body"], message, "too_large")]

    def _busy(self, what: str, others: int) -> _Refusal:
        message = (f"server busy: {what} on top of the {others} bytes of other requests in flight would pass "
                   f"max_inflight_bytes ({self.max_inflight_bytes}); retry later")
        return 503, [_detail(["body"], message, "busy")]


async def _drain(receive: Receive, budget: int) -> bool:
    """Read and drop the rest of a request body; True when it ended within `budget` bytes."""
    while budget >= 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return budget >= 0
    return False


class _FlaggedObject(dict[str, Any]):
    """A parsed JSON object that repeats a key or holds too many: (loc below it, message, type) per problem."""

    problems: list[tuple[list[str], str, str]]


class _JSONRefused(StarletteHTTPException):
    """A JSON body refused with the locations of its problems. An HTTPException, because FastAPI turns any
    other exception of the body's parsing into a bare 400."""

    def __init__(self, details: list[dict[str, Any]]) -> None:
        super().__init__(422, details[0]["msg"])
        self.details = details


def _json_object(flagged: list[_FlaggedObject], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: the object as a dict, flagged when it repeats a key (a plain dict keeps the
    last one silently) or holds more keys than any object of the request may."""
    value = dict(pairs)
    if len(value) == len(pairs) and len(pairs) <= _MAX_OBJECT_KEYS:
        return value
    marked = _FlaggedObject(value)
    if len(pairs) > _MAX_OBJECT_KEYS:
        marked.problems = [([], f"a JSON object of {len(pairs)} keys, more than the {_MAX_OBJECT_KEYS} any object "
                                f"of this API may hold", "json_too_many_keys")]
    else:
        marked.problems = [([key], f"duplicate key {key!r}: given {count} times in one JSON object, each key may "
                                   f"appear once", "json_duplicate_key")
                           for key, count in Counter(key for key, _ in pairs).items() if count > 1]
    flagged.append(marked)
    return marked


def _flagged_details(document: Any) -> list[dict[str, Any]]:
    """The problems of the flagged objects in `document`, in document order, each at its location (one is
    always found: an object dropped for a repeated key leaves the object that repeated it flagged)."""
    details: list[dict[str, Any]] = []
    # Iterative (the document may nest as deep as the parser allowed) and with linked paths (key, parent),
    # that are spelled out for a problem only.
    stack: list[tuple[Any, tuple[Any, Any] | None]] = [(document, None)]
    while stack and len(details) < _MAX_REPORTED_ERRORS:
        value, path = stack.pop()
        if isinstance(value, _FlaggedObject):
            loc: list[Any] = []
            node = path
            while node is not None:
                loc.insert(0, node[0])
                node = node[1]
            details.extend(_detail(["body", *loc, *below], msg, kind) for below, msg, kind in value.problems)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        children = [(child, (key, path)) for key, child in items if isinstance(child, (dict, list))]
        stack.extend(reversed(children))
    return details[:_MAX_REPORTED_ERRORS]


class _SafeJSONRequest(Request):
    """Request whose JSON parsing fails as a JSON error (422) on anything json.loads rejects,
    including nesting deep enough to exhaust the stack and integers with too many digits, and
    on an object that repeats a key or holds too many."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            flagged: list[_FlaggedObject] = []
            try:
                document = json.loads(body, object_pairs_hook=functools.partial(_json_object, flagged))
            except json.JSONDecodeError:
                raise
            except RecursionError:
                raise json.JSONDecodeError("JSON nested too deeply", "", 0) from None
            except ValueError as exc:  # invalid UTF-8, integers over Python's digit limit
                raise json.JSONDecodeError(str(exc)[:200], "", 0) from None
            if flagged:
                raise _JSONRefused(_flagged_details(document))
            self._json = document
        return self._json


class _SafeJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def safe_handler(request: Request) -> Response:
            return await handler(_SafeJSONRequest(request.scope, request.receive))

        return safe_handler


# -- scoring ---------------------------------------------------------------------------------------------


def _shape_errors(rollouts: list[Any]) -> list[dict[str, Any]]:
    """Every rollout must give the same fields, all with the same k; hidden vectors one size."""
    errors: list[dict[str, Any]] = []
    present = {name for name in _ROLLOUT_FIELDS if getattr(rollouts[0], name) is not None}
    steps: tuple[int, str] | None = None  # (k, where it was first seen)
    width: tuple[int, str] | None = None  # (D, where it was first seen)
    for row, rollout in enumerate(rollouts):
        for name in _ROLLOUT_FIELDS:
            value = getattr(rollout, name)
            loc = ["body", "rollouts", row, name]
            if (value is not None) != (name in present):
                state = "given here but missing in" if value is not None else "missing here but given in"
                errors.append(_detail(loc, f"{state} rollouts.0: every rollout must give the same fields", "fields"))
                continue
            if value is None or name not in _SEQUENCE_FIELDS:
                continue
            if steps is None:
                steps = (len(value), f"rollouts.{row}.{name}")
            elif len(value) != steps[0]:
                errors.append(_detail(
                    loc, f"has {len(value)} steps but {steps[1]} has {steps[0]}: every sequence needs the same k",
                    "ragged"))
            if name.endswith("hidden"):
                for step, vector in enumerate(value):
                    if width is None:
                        width = (len(vector), f"rollouts.{row}.{name}.{step}")
                    elif len(vector) != width[0]:
                        errors.append(_detail(
                            [*loc, step], f"ragged hidden states: {len(vector)} values but {width[1]} has {width[0]}",
                            "ragged"))
                        break
        if len(errors) >= _MAX_REPORTED_ERRORS:
            break
    return errors


def _stacked_hidden(rollouts: list[Any], name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The rollouts' `name` hidden states as one [N, k, D] tensor of `dtype`; a value beyond the dtype's
    range (finite in JSON, infinite in float32), or one the dtype cannot hold to its precision beside the
    largest value of its vector, is a 422 naming it."""
    if getattr(rollouts[0], name) is None:
        return None
    exact = torch.tensor([getattr(rollout, name) for rollout in rollouts], dtype=torch.float64)
    values = exact.to(dtype)  # rounds as converting the JSON numbers to `dtype` directly does
    dtype_name = str(dtype).removeprefix("torch.")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        row, step, index = (int(i) for i in (~finite).nonzero()[0])
        value = getattr(rollouts[row], name)[step][index]
        raise RequestValidationError([_detail(
            ["body", "rollouts", row, name, step, index],
            f"{value!r} is outside the range of dtype {dtype_name!r}: send \"dtype\": \"float64\"", "dtype_range")])
    if dtype != torch.float64:
        # Below float32's normal range a value keeps few bits or none (1e-46 becomes 0, 2e-45 becomes 1.4e-45),
        # which changed a cosine silently; a value too small to matter beside the rest of its vector may go.
        error = (values.to(torch.float64) - exact).abs()
        lost = error > exact.abs().amax(dim=-1, keepdim=True) * (torch.finfo(dtype).eps / 2)
        if bool(lost.any()):
            row, step, index = (int(i) for i in lost.nonzero()[0])
            value = getattr(rollouts[row], name)[step][index]
            raise RequestValidationError([_detail(
                ["body", "rollouts", row, name, step, index],
                f"{value!r} is below the precision of dtype {dtype_name!r} (it becomes "
                f"{float(values[row, step, index])!r}): send \"dtype\": \"float64\"", "dtype_precision")])
    return values


def _reward_inputs(rollouts: list[Any], hidden: dict[str, torch.Tensor | None]) -> RewardInputs:
    first = rollouts[0]

    def tokens(name: str) -> torch.Tensor | None:
        if getattr(first, name) is None:
            return None
        return torch.tensor([getattr(rollout, name) for rollout in rollouts], dtype=torch.long)

    return RewardInputs(
        rollout_tokens=tokens("rollout_tokens"),
        ground_truth_tokens=tokens("ground_truth_tokens"),
        rollout_hidden=hidden["rollout_hidden"],
        ground_truth_hidden=hidden["ground_truth_hidden"],
        rollout_texts=None if first.rollout_text is None else [rollout.rollout_text for rollout in rollouts],
        reference_texts=None if first.reference_texts is None else [rollout.reference_texts for rollout in rollouts],
        count=len(rollouts),
    )


class _RewardRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _RewardFailed(Exception):
    """A reward function raised: answered as a JSON 500 by a handler of its own.

    Starlette's catch-all handler re-raises after answering, and uvicorn then closes the connection,
    which can reset it before the client has read the answer; a specific handler does not re-raise.
    """

    def __init__(self, error: BaseException, message: str | None = None) -> None:
        super().__init__(message or f"internal error ({type(error).__name__})")
        self.message = str(self)


def create_app(
    *,
    max_batch: int = ScoreLimits.model_fields["max_batch"].default,
    max_rollout_len: int = ScoreLimits.model_fields["max_rollout_len"].default,
    max_hidden_dim: int = ScoreLimits.model_fields["max_hidden_dim"].default,
    max_text_chars: int = ScoreLimits.model_fields["max_text_chars"].default,
    max_references: int = ScoreLimits.model_fields["max_references"].default,
    max_body_bytes: int = ScoreLimits.model_fields["max_body_bytes"].default,
    max_inflight_bytes: int = ScoreLimits.model_fields["max_inflight_bytes"].default,
    max_body_seconds: int = ScoreLimits.model_fields["max_body_seconds"].default,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The reward service's HTTP app with the given request limits."""
    limits = ScoreLimits(
        max_batch=max_batch, max_rollout_len=max_rollout_len, max_hidden_dim=max_hidden_dim,
        max_text_chars=max_text_chars, max_references=max_references, max_body_bytes=max_body_bytes,
        max_inflight_bytes=max_inflight_bytes, max_body_seconds=max_body_seconds,
    )
    metrics = metrics or Metrics()
    score_request = _request_models(limits)
    app = FastAPI(
        title="REFINE reward service",
        version="1",
        description=(
            "Scores rollouts with the registered rewards (self-supervised and task rewards). `dtype` (float32, "
            "the default, or float64) is the precision the hidden states are scored in: float32 gives the rewards "
            "the service's reward replicas give float32 models, bit for bit; float64 scores the JSON numbers at "
            "full precision."
        ),
    )
    app.router.route_class = _SafeJSONRoute
    app.state.limits = limits
    app.state.metrics = metrics
    app.add_middleware(_BodyGuard, max_body_bytes=limits.max_body_bytes, max_inflight_bytes=limits.max_inflight_bytes,
                       max_body_seconds=limits.max_body_seconds, json_paths=frozenset({SCORE_PATH}))
    _install_error_handlers(app)
    errors = {status: {"model": ErrorResponse} for status in (400, 408, 413, 415, 422, 503)}

    def score(request: score_request) -> ScoreResponse:  # type: ignore[valid-type]
        shape_errors = _shape_errors(request.rollouts)
        if shape_errors:
            raise RequestValidationError(shape_errors)
        dtype = _HIDDEN_DTYPES[request.dtype]
        hidden = {name: _stacked_hidden(request.rollouts, name, dtype)
                  for name in ("rollout_hidden", "ground_truth_hidden")}
        started = time.perf_counter()
        try:
            rewards = compute_reward(request.reward_type, _reward_inputs(request.rollouts, hidden))
        except RewardOutputError as exc:  # the reward function's fault, not the request's
            logger.error("reward service: %s", exc)
            raise _RewardFailed(exc, str(exc)) from exc
        except (MissingRewardInput, ValidationError) as exc:  # rollouts without a field it reads, or inconsistent
            # RewardInputs calls the texts "rollout_texts"; this API's field is "rollout_text".
            reason = str(exc).replace("'rollout_texts'", "'rollout_text'")
            raise _RewardRefused(f"reward {request.reward_type!r} cannot score these rollouts: {reason}") from exc
        # Any other error is the reward's (a ValueError inside torch too); a plugin's sys.exit() ends no server.
        except (Exception, SystemExit) as exc:
            logger.exception("reward service: reward %r failed", request.reward_type)
            raise _RewardFailed(exc) from exc
        seconds = time.perf_counter() - started
        response = ScoreResponse(reward_type=request.reward_type, rewards=rewards.tolist(), latency_ms=seconds * 1e3)
        record_scored(metrics, request.reward_type, rewards, seconds)  # one request is one batch, as a replica's
        return response

    app.post(SCORE_PATH, response_model=ScoreResponse, responses=errors, summary="Score rollouts")(score)

    @app.exception_handler(_RewardRefused)
    async def _refused(_request: Request, exc: _RewardRefused) -> JSONResponse:
        return _error_response(400, [_detail(["body", "rollouts"], exc.message, "reward_refused")])

    @app.exception_handler(_RewardFailed)
    async def _failed(_request: Request, exc: _RewardFailed) -> JSONResponse:
        return _error_response(500, [_detail(["server"], exc.message, "internal")])

    # These answer on the event loop (async def), never queued behind scoring in the worker threads: a liveness
    # probe must not time out while every thread scores a slow batch.
    @app.get("/v1/rewards", summary="Registered reward types")
    async def rewards() -> dict[str, list[str]]:
        return {"rewards": available_rewards()}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class JSONErrorH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11), answering a request it cannot parse (a bad Content-Length, an illegal
    request line) with the JSON error body of the app's errors instead of uvicorn's plain text."""

    _head = b""  # the head of the request being parsed, as far as it came in one piece: its bad header is quoted

    def data_received(self, data: bytes) -> None:
        # Data that comes while a request is under way may hold the next one's head: none is quoted then.
        self._head = data[:16384].split(b"\r\n\r\n", 1)[0] if self.conn.their_state is h11.IDLE else b""
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this inside its `except h11.RemoteProtocolError`: the problem h11 found.
        error = sys.exc_info()[1]
        reason = str(error) if isinstance(error, h11.ProtocolError) and str(error) else msg
        loc = ["request"]
        for header in ("content-length", "transfer-encoding"):
            if header in reason.lower():
                loc = ["header", header]
                found = re.findall(rb"(?im)^" + header.encode() + rb"[ \t]*:[ \t]*(.*?)[ \t]*\r?$", self._head)
                if found:
                    reason += ", got " + ", ".join(repr(value.decode("latin-1")) for value in found[:4])
        # As JSONResponse renders the app's errors.
        content = JSONResponse(_error_content([_detail(loc, f"invalid HTTP request: {reason}", "http_invalid")])).body
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                   (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=bytes(content))))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    limits: ScoreLimits | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Run the HTTP API with uvicorn until interrupted (loopback by default)."""
    limits = limits or ScoreLimits()
    app = create_app(**limits.model_dump(), metrics=metrics)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=JSONErrorH11Protocol)
