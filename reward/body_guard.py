"""The request body guard: limits on the raw ASGI body (size, Content-Type, arrival time, bytes in flight)."""

import asyncio
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reward.http_errors import error_detail, error_response

_Refusal = tuple[int, list[dict[str, Any]]]  # (status, error details)


class BodyGuard:
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
                    refusal = 408, [error_detail(["body"], f"request body not received within max_body_seconds "
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
        await error_response(status, details, headers=answer_headers)(scope, receive, send)

    def _refuse_headers(self, scope: Scope, headers: Headers) -> tuple[_Refusal | None, int | None]:
        """(refusal as (status, details) or None, the declared Content-Length or None)."""
        declared = headers.get("content-length")
        length = int(declared) if declared is not None and declared.strip().isdigit() else None
        if scope["path"] in self.json_paths:
            content_type = headers.get("content-type")
            media_type = (content_type or "").split(";")[0].strip().lower()
            if media_type != "application/json" and not media_type.endswith("+json"):
                got = repr(content_type) if content_type is not None else "no Content-Type header"
                return (415, [error_detail(["header", "content-type"], f"must be application/json, got {got}",
                                      "content_type")]), length
            encoding = headers.get("content-encoding")
            if encoding is not None and encoding.strip().lower() not in ("", "identity"):
                # A compressed body read as JSON failed as "invalid JSON ... utf-8 codec", naming no header.
                return (415, [error_detail(["header", "content-encoding"], f"must be absent or 'identity' (the body "
                                           f"is read as plain JSON, not decompressed), got {encoding!r}",
                                           "content_encoding")]), length
        if declared is not None and length is None:
            return (400, [error_detail(["header", "content-length"], f"not a byte count: {declared!r}",
                                  "content_length")]), None
        if length is not None and length > self.max_body_bytes:
            return self._too_large(f"Content-Length is {length}"), length
        return None, length

    def _too_large(self, what: str) -> _Refusal:
        message = f"request body too large: {what}, max_body_bytes is {self.max_body_bytes}"
        return 413, [error_detail(["body"], message, "too_large")]

    def _busy(self, what: str, others: int) -> _Refusal:
        message = (f"server busy: {what} on top of the {others} bytes of other requests in flight would pass "
                   f"max_inflight_bytes ({self.max_inflight_bytes}); retry later")
        return 503, [error_detail(["body"], message, "busy")]


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
