"""The request body guard of the HTTP API, served for real: what a client can make the server hold is bounded,
and every way a request ends gives its bytes back."""

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch

from http_helpers import COSINE, JSON, MAX_BODY, head, read_response, request_with, rollouts, serving
from refine.algorithm.rewards import RewardInputs, register_reward, unregister_reward
from reward.http import create_app


@pytest.fixture(scope="module")
def tight() -> Iterator[httpx.Client]:
    """A server whose bodies in flight may hold one full-size body together, and that waits 1 s for a body."""
    app = create_app(max_body_bytes=MAX_BODY, max_inflight_bytes=MAX_BODY, max_body_seconds=1)
    with serving(app) as http:
        yield http


def padded(body: Any, size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes (trailing whitespace)."""
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


FULL_SIZE = padded(request_with("cosine"), MAX_BODY)


def connect(client: httpx.Client) -> socket.socket:
    return socket.create_connection(("127.0.0.1", client.base_url.port), timeout=10)


def scores_full_size(client: httpx.Client, seconds: float = 5) -> httpx.Response:
    """A request of the whole budget, retried while it is answered 503: it is scored once every earlier
    request has given its bytes back (a client's disconnect reaches the server a moment later)."""
    deadline = time.monotonic() + seconds
    while True:
        response = client.post("/v1/score", content=FULL_SIZE, headers=JSON)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_requests_past_max_inflight_bytes_are_answered_503_with_retry_after(tight):
    """Four 32 MB bodies at once took 4.6 GB: nothing bounded the requests in flight."""
    holder = connect(tight)  # declares a full-size body and sends half of it
    try:
        holder.sendall(head(MAX_BODY) + b" " * (MAX_BODY // 2))
        second = padded(request_with("cosine"), MAX_BODY // 2 + 1024)
        deadline = time.monotonic() + 20
        while True:  # until the server has received all the holder's bytes before this request's headers
            response = tight.post("/v1/score", content=second, headers=JSON)
            # 200: none of the holder's bytes were in yet; 503 "received so far": the rest came in during this body
            refused_early = response.status_code == 503 and "Content-Length" in response.json()["error"]
            if refused_early or response.status_code not in (200, 503) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        detail = response.json()["detail"]
        assert len(detail) == 1 and detail[0]["type"] == "busy"
        assert response.json()["error"].startswith(f"body: server busy: its Content-Length {len(second)} on top of ")
        assert f"would pass max_inflight_bytes ({MAX_BODY}); retry later" in response.json()["error"]
        # Refused from its Content-Length before any of its body is sent: no 100 Continue comes first.
        asker = connect(tight)
        with asker:
            asker.sendall(head(len(second), expect=True))
            status, headers, body = read_response(asker)
        assert status == 503 and headers["retry-after"] == "1", body
        assert json.loads(body)["detail"][0]["type"] == "busy"
        # A body sent without a Content-Length is refused once its bytes pass the bound.
        pieces = [second[i:i + 4096] for i in range(0, len(second), 4096)]
        response = tight.post("/v1/score", content=iter(pieces), headers=JSON)
        assert response.status_code == 503 and "received so far" in response.json()["error"], response.text
        # A small request still fits beside the held bytes.
        response = tight.post("/v1/score", json=request_with("cosine"))
        assert response.status_code == 200, response.text
    finally:
        holder.close()
    response = scores_full_size(tight)
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == pytest.approx(COSINE)


def test_the_bytes_in_flight_are_given_back_however_a_request_ends(tight):
    """The budget holds one full-size body: after each way a request can end, a full-size request is scored."""

    def failing(inputs: RewardInputs) -> torch.Tensor:
        raise RuntimeError("plugin bug")

    scoring = threading.Event()

    def slow(inputs: RewardInputs) -> torch.Tensor:
        scoring.set()
        time.sleep(1.0)
        return torch.zeros(inputs.num_rollouts)

    def post(content: bytes, status: int, path: str = "/v1/score", chunked: bool = False) -> None:
        sent: Any = iter([content[i:i + 8192] for i in range(0, len(content), 8192)]) if chunked else content
        response = tight.post(path, content=sent, headers=JSON)
        assert response.status_code == status, response.text

    def disconnect_mid_body() -> None:
        with connect(tight) as sock:
            sock.sendall(head(MAX_BODY) + FULL_SIZE[: MAX_BODY // 2])

    def disconnect_while_scored() -> None:
        with connect(tight) as sock:
            sock.sendall(head(MAX_BODY) + padded({"reward_type": "test_slow", "rollouts": rollouts()}, MAX_BODY))
            assert scoring.wait(timeout=10)
        # The bytes stay counted while the request is scored, answered to no one.
        assert tight.post("/v1/score", content=FULL_SIZE, headers=JSON).status_code == 503

    def stall() -> None:
        with connect(tight) as sock:
            sock.sendall(head(MAX_BODY) + b"{")
            status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close", body
        assert json.loads(body)["error"] == ("body: request body not received within max_body_seconds (1): "
                                             "1 bytes came")

    ways: list[tuple[str, Callable[[], None]]] = [
        ("scored", lambda: post(FULL_SIZE, 200)),
        ("scored, chunked", lambda: post(FULL_SIZE, 200, chunked=True)),
        ("invalid JSON", lambda: post(b"{" + b" " * (MAX_BODY - 1), 422)),
        ("duplicate key", lambda: post(padded({"rollouts": 1}, MAX_BODY).replace(b"{", b'{"rollouts": 2, ', 1)[
            :MAX_BODY], 422)),
        ("schema error", lambda: post(padded(request_with("cosine", dtype="float16"), MAX_BODY), 422)),
        ("reward refused", lambda: post(padded({"reward_type": "binary", "rollouts": rollouts(("hidden",))},
                                               MAX_BODY), 400)),
        ("reward failed", lambda: post(padded({"reward_type": "test_failing", "rollouts": rollouts()}, MAX_BODY),
                                       500)),
        ("too large", lambda: post(FULL_SIZE + b" ", 413)),
        ("too large, chunked", lambda: post(FULL_SIZE + b" ", 413, chunked=True)),
        ("not found", lambda: post(FULL_SIZE, 404, path="/v1/nothing")),
        ("client gone mid-body", disconnect_mid_body),
        ("client gone while scored", disconnect_while_scored),
        ("body stalled", stall),
    ]
    register_reward("test_failing")(failing)
    register_reward("test_slow")(slow)
    try:
        for name, end in ways:
            end()
            response = scores_full_size(tight)
            assert response.status_code == 200, (name, response.text)
    finally:
        unregister_reward("test_failing")
        unregister_reward("test_slow")
