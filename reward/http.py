"""HTTP API of the reward service: anyone can score completions with a registered reward.

    POST /v1/score      {reward_type, rollouts: [...], dtype} -> {reward_type, rewards, latency_ms}
    GET  /v1/rewards    registered reward types
    GET  /healthz       liveness
    GET  /metrics       Prometheus text
    GET  /openapi.json  the schema (also /docs)

Every error is a JSON body {"error": "<field>: <problem>", "detail": [{loc, field, msg, type}]}
with a 4xx status: 413 for a body over `max_body_bytes` (refused before it is read in full), 415 for
a body that is not JSON or is compressed (a Content-Encoding other than identity), 422 for a request that does not match the schema (the pydantic error
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

import logging
import re
import sys
import time
from typing import Annotated, Literal

import h11
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from uvicorn.protocols.http.h11_impl import H11Protocol

import reward.functions  # noqa: F401  (registers the task rewards)
from refine.algorithm.rewards import MissingRewardInput, RewardOutputError, available_rewards, compute_reward
from reward.body_guard import BodyGuard
from reward.http_errors import ErrorResponse, error_content, error_detail, error_response, install_error_handlers
from reward.rollout_inputs import reward_inputs, shape_errors, stacked_hidden
from reward.safe_json import SafeJSONRoute
from reward.scoring import record_scored
from services.metrics import ROLE_FAMILIES, Metrics

__all__ = ["JSONErrorH11Protocol", "ScoreLimits", "ScoreResponse", "create_app", "serve"]

logger = logging.getLogger(__name__)

MAX_TOKEN_ID = 2**31 - 1
SCORE_PATH = "/v1/score"
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
    metrics = metrics or Metrics(families=ROLE_FAMILIES["reward"])
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
    app.router.route_class = SafeJSONRoute
    app.state.limits = limits
    app.state.metrics = metrics
    app.add_middleware(BodyGuard, max_body_bytes=limits.max_body_bytes, max_inflight_bytes=limits.max_inflight_bytes,
                       max_body_seconds=limits.max_body_seconds, json_paths=frozenset({SCORE_PATH}))
    install_error_handlers(app)
    errors = {status: {"model": ErrorResponse} for status in (400, 408, 413, 415, 422, 503)}

    def score(request: score_request) -> ScoreResponse:  # type: ignore[valid-type]
        problems = shape_errors(request.rollouts)
        if problems:
            raise RequestValidationError(problems)
        dtype = _HIDDEN_DTYPES[request.dtype]
        hidden = {name: stacked_hidden(request.rollouts, name, dtype)
                  for name in ("rollout_hidden", "ground_truth_hidden")}
        started = time.perf_counter()
        try:
            rewards = compute_reward(request.reward_type, reward_inputs(request.rollouts, hidden))
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
        return error_response(400, [error_detail(["body", "rollouts"], exc.message, "reward_refused")])

    @app.exception_handler(_RewardFailed)
    async def _failed(_request: Request, exc: _RewardFailed) -> JSONResponse:
        return error_response(500, [error_detail(["server"], exc.message, "internal")])

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
        detail = error_detail(loc, f"invalid HTTP request: {reason}", "http_invalid")
        content = JSONResponse(error_content([detail])).body
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
