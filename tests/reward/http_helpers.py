"""The reward service's HTTP API served for the tests by uvicorn on a loopback port, the requests they send, and
raw HTTP/1.1 for what a client library will not send."""

import contextlib
import copy
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from reward.http import JSONErrorH11Protocol

MAX_BATCH = 8
MAX_K = 16
MAX_DIM = 32
MAX_TEXT = 2000
MAX_REFERENCES = 4
MAX_BODY = 64 * 1024
JSON = {"content-type": "application/json"}

# The hand-made vectors of the reward-math tests: cosine per rollout = [(1 + 1/sqrt 2) / 2, 0].
HIDDEN = [[[1.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [-2.0, 0.0]]]
TRUTH_HIDDEN = [[[5.0, 0.0], [1.0, 1.0]], [[-1.0, 0.0], [-1.0, 0.0]]]
COSINE = [(1 + 1 / math.sqrt(2)) / 2, 0.0]
TOKENS = [[4, 7], [1, 1]]
TRUTH_TOKENS = [[4, 8], [1, 1]]
BINARY = [0.5, 1.0]


@contextlib.contextmanager
def serving(app: Any) -> Iterator[httpx.Client]:
    """`app` served by uvicorn with the HTTP protocol `serve` uses, on a loopback port, and a client of it."""
    # The server keeps this socket: no race for the port. IPPROTO_TCP explicitly, or asyncio does not set
    # TCP_NODELAY on the accepted connections and every response waits 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off", http=JSONErrorH11Protocol))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def rollouts(fields: tuple[str, ...] = ("tokens", "hidden")) -> list[dict[str, Any]]:
    out = []
    for row in range(2):
        item: dict[str, Any] = {}
        if "tokens" in fields:
            item.update(rollout_tokens=list(TOKENS[row]), ground_truth_tokens=list(TRUTH_TOKENS[row]))
        if "hidden" in fields:
            item.update(rollout_hidden=copy.deepcopy(HIDDEN[row]), ground_truth_hidden=copy.deepcopy(TRUTH_HIDDEN[row]))
        if "text" in fields:
            item.update(rollout_text="The cat sat on the mat.", reference_texts=["a cat on a mat", "dog"])
        out.append(item)
    return out


def check_correct_requests(client: httpx.Client) -> None:
    expected = {"cosine": COSINE, "binary": BINARY, "hybrid": [c + b for c, b in zip(COSINE, BINARY)]}
    for reward_type, values in expected.items():
        response = client.post("/v1/score", json={"reward_type": reward_type, "rollouts": rollouts()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["reward_type"] == reward_type
        assert body["rewards"] == pytest.approx(values)
        assert body["latency_ms"] >= 0
    response = client.post("/v1/score", json={"reward_type": "qa_f1", "rollouts": rollouts(("text",))})
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == pytest.approx([6 / 7, 6 / 7])
    text_rollouts = [{"rollout_text": "It is Paris.\nNot Rome", "reference_texts": ["paris"]},
                     {"rollout_text": "It is Paris.\nNot Rome", "reference_texts": ["rome"]}]
    response = client.post("/v1/score", json={"reward_type": "substring_match", "rollouts": text_rollouts})
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == [1.0, 0.0]


def request_with(reward_type: str = "hybrid", **changes: Any) -> dict[str, Any]:
    return {"reward_type": reward_type, "rollouts": rollouts(), **changes}


def head(length: int | None, *, expect: bool = False) -> bytes:
    lines = ["POST /v1/score HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Expect: 100-continue"] if expect else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The first response on `sock` (an interim 100 Continue included): status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    length = int(headers.get("content-length", 0))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]
