"""The reward service's HTTP errors: the JSON error body, its models, and the app's handlers that answer with it."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from refine.errors import shown

__all__ = ["ErrorDetail", "ErrorResponse"]

logger = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 20


class ErrorDetail(BaseModel):
    loc: list[str | int]
    field: str
    msg: str
    type: str


class ErrorResponse(BaseModel):
    error: str = Field(description="the first problems, as '<field>: <problem>'")
    detail: list[ErrorDetail] = Field(default_factory=list)


def _field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if len(parts) > 1 and parts[0] == "body":
        if isinstance(parts[1], int):
            return "body"  # a character offset of invalid JSON, not a field
        parts = parts[1:]  # "body" is implied
    return ".".join(str(part) for part in parts) or "body"


def error_content(details: list[dict[str, Any]]) -> dict[str, Any]:
    summary = "; ".join(f"{item['field']}: {item['msg']}" for item in details[:5])
    if len(details) > 5:
        summary += f"; and {len(details) - 5} more"
    return {"error": summary, "detail": details}


def error_response(status: int, details: list[dict[str, Any]], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_content(details), status_code=status, headers=headers)


def error_detail(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "field": _field_name(loc), "msg": msg, "type": kind}


def _validation_details(errors: list[Any]) -> list[dict[str, Any]]:
    details = []
    for error in errors[:MAX_REPORTED_ERRORS]:
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
        details.append(error_detail(loc, msg, kind))
    if len(errors) > MAX_REPORTED_ERRORS:
        details.append(error_detail(["body"], f"{len(errors) - MAX_REPORTED_ERRORS} more errors not shown", "too_many"))
    return details


class JSONRefused(StarletteHTTPException):
    """A JSON body refused with the locations of its problems. An HTTPException, because FastAPI turns any
    other exception of the body's parsing into a bare 400."""

    def __init__(self, details: list[dict[str, Any]]) -> None:
        super().__init__(422, details[0]["msg"])
        self.details = details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_details(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "error"
        loc = ["path"] if exc.status_code in (404, 405) else ["body"]
        detail = error_detail(loc, f"{message} ({request.method} {request.url.path})", f"http_{exc.status_code}")
        return error_response(exc.status_code, [detail], headers=getattr(exc, "headers", None))

    @app.exception_handler(JSONRefused)
    async def _json_refused(_request: Request, exc: JSONRefused) -> JSONResponse:
        return error_response(exc.status_code, exc.details)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("reward service: unexpected error")
        # Starlette raises the exception again once this answer is sent, and uvicorn then drops the connection:
        # the client must not send its next request on it.
        return error_response(500, [error_detail(["server"], f"internal error ({type(exc).__name__})", "internal")],
                               headers={"Connection": "close"})
