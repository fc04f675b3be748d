"""The HTTP API served for real by uvicorn on a loopback port: hundreds of malformed or oversized
requests each get a 4xx JSON answer naming the problem, and correct requests still score right."""

import gzip
import json
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import torch

from http_helpers import (
    JSON, MAX_BATCH, MAX_BODY, MAX_DIM, MAX_K, MAX_REFERENCES, MAX_TEXT, check_correct_requests, head, read_response,
    request_with, rollouts, serving,
)
from refine.algorithm.rewards import RewardInputs, available_rewards, register_reward, unregister_reward
from reward.__main__ import main
from reward.http import create_app
from reward.scoring import score_batch


def test_endpoints_and_schema(client):
    check_correct_requests(client)
    assert client.get("/healthz").json() == {"status": "ok"}
    rewards = client.get("/v1/rewards").json()["rewards"]
    assert {"cosine", "binary", "hybrid", "qa_f1", "substring_match"} <= set(rewards)
    schema = client.get("/openapi.json").json()
    assert "/v1/score" in schema["paths"]
    rollout_schema = schema["components"]["schemas"]["Rollout"]["properties"]["rollout_hidden"]["anyOf"][0]
    assert rollout_schema["maxItems"] == MAX_K and rollout_schema["items"]["maxItems"] == MAX_DIM
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'refine_reward_mean{reward_type="cosine"}' in metrics.text
    assert "refine_reward_latency_seconds_count" in metrics.text


# ------------------------------------------------------------------------------------ malformed requests


@dataclass
class Case:
    name: str
    status: int
    words: list[str]  # each must appear (case-insensitively) in the error body
    body: Any = None  # a JSON value, serialized with json.dumps
    raw: bytes | None = None  # or raw bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = "/v1/score"
    chunked: bool = False


WRONG_SCALARS = ["3", 1.5, True, None, [1], {"a": 1}, -1, 2**40]
WRONG_NUMBERS = ["x", "1.0", None, True, [1.0], {"v": 1}]


def malformed_cases(rng: random.Random) -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # Wrong types at the top level.
    for value in [1, 2.5, None, True, [], {}, ["cosine"], ""]:
        add(Case(f"reward_type={value!r}", 422, ["reward_type"], request_with(reward_type=value)))
    for value in ["x", 1, {}, None, True, [1], [[]], ["rollout"]]:
        add(Case(f"rollouts={value!r}", 422, ["rollouts"], request_with(rollouts=value)))
    for value in [[], "text", 1, None, {"reward_type": "cosine"}]:
        add(Case(f"body={value!r}", 422, ["body" if not isinstance(value, dict) else "rollouts"], value))
    # Missing fields.
    add(Case("empty object", 422, ["reward_type", "rollouts", "required"], {}))
    add(Case("no reward_type", 422, ["reward_type", "required"], {"rollouts": rollouts()}))
    add(Case("no rollouts", 422, ["rollouts", "required"], {"reward_type": "cosine"}))
    add(Case("empty rollouts", 422, ["rollouts"], request_with(rollouts=[])))
    add(Case("empty body", 422, ["body", "required"], raw=b""))
    # Unknown reward types and unknown fields.
    for _ in range(40):
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_-0123456789") for _ in range(rng.randint(1, 30)))
        add(Case(f"unknown reward {name}", 422, ["reward_type", "unknown"], request_with(reward_type=name + "_x")))
    for _ in range(20):
        name = "extra_" + "".join(rng.choice("abcdefgh") for _ in range(6))
        body = request_with()
        if rng.random() < 0.5:
            body[name] = 1
            add(Case(f"extra top-level {name}", 422, [name, "extra"], body))
        else:
            body["rollouts"][rng.randrange(2)][name] = [1]
            add(Case(f"extra rollout field {name}", 422, [name, "extra"], body))
    # Wrong types inside token lists and hidden states.
    for _ in range(80):
        body = request_with()
        row = rng.randrange(2)
        name = rng.choice(["rollout_tokens", "ground_truth_tokens"])
        value = rng.choice(WRONG_SCALARS)
        body["rollouts"][row][name][rng.randrange(2)] = value
        add(Case(f"{name}[{row}]={value!r}", 422, [f"rollouts.{row}.{name}"], body))
    for _ in range(80):
        body = request_with()
        row, step, index = rng.randrange(2), rng.randrange(2), rng.randrange(2)
        name = rng.choice(["rollout_hidden", "ground_truth_hidden"])
        value = rng.choice(WRONG_NUMBERS)
        body["rollouts"][row][name][step][index] = value
        add(Case(f"{name} value {value!r}", 422, [f"rollouts.{row}.{name}.{step}.{index}"], body))
    for value in [[1.0, 2.0], 3.0, "hidden", [[[1.0]]], [[]], []]:
        body = request_with()
        body["rollouts"][0]["rollout_hidden"] = value
        add(Case(f"hidden shaped {value!r}", 422, ["rollouts.0.rollout_hidden"], body))
    # Text fields of the wrong type.
    for name, value in [("rollout_text", 5), ("rollout_text", ["a"]), ("rollout_text", None),
                        ("reference_texts", "paris"), ("reference_texts", []), ("reference_texts", [1]),
                        ("reference_texts", [None]), ("reference_texts", {"a": "b"})]:
        body = {"reward_type": "qa_f1", "rollouts": rollouts(("text",))}
        body["rollouts"][1][name] = value
        add(Case(f"{name}={value!r}", 422, [f"rollouts.1.{name}"], body))
    # Blank gold answers: an empty one is a substring of every completion.
    for reward_type in ("qa_f1", "substring_match"):
        for references, index in [([""], 0), (["   "], 0), (["paris", "\n\t"], 1)]:
            body = {"reward_type": reward_type, "rollouts": rollouts(("text",))}
            body["rollouts"][1]["reference_texts"] = references
            add(Case(f"{reward_type} reference_texts={references!r}", 422,
                     [f"rollouts.1.reference_texts.{index}", "empty or whitespace"], body))
    # NaN and infinities, as the JSON literals Python's parser accepts and as overflowing numbers.
    for _ in range(60):
        body = request_with()
        row, step, index = rng.randrange(2), rng.randrange(2), rng.randrange(2)
        name = rng.choice(["rollout_hidden", "ground_truth_hidden"])
        literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
        body["rollouts"][row][name][step][index] = "@@"
        raw = json.dumps(body).replace('"@@"', literal).encode()
        add(Case(f"{name} {literal}", 422, [f"rollouts.{row}.{name}.{step}.{index}", "finite"], raw=raw))
    # Ragged shapes.
    for _ in range(40):
        body = request_with()
        row, step = rng.randrange(2), rng.randrange(2)
        name = rng.choice(["rollout_hidden", "ground_truth_hidden"])
        body["rollouts"][row][name][step] = [0.5] * rng.choice([1, 3, 4])
        add(Case(f"ragged {name}", 422, ["ragged", f"rollouts.{row}.{name}"], body))
    for _ in range(20):
        body = request_with()
        row = rng.randrange(2)
        name = rng.choice(["rollout_tokens", "ground_truth_tokens", "rollout_hidden", "ground_truth_hidden"])
        extra = [3] if name.endswith("tokens") else [[0.5, 0.5]]
        body["rollouts"][row][name] = body["rollouts"][row][name] + extra * rng.randint(1, 3)
        add(Case(f"k mismatch in {name}", 422, ["steps", f"rollouts.{row}.{name}"], body))
    for _ in range(20):
        body = request_with()
        name = rng.choice(["rollout_tokens", "ground_truth_tokens", "rollout_hidden", "ground_truth_hidden"])
        del body["rollouts"][1][name]
        add(Case(f"{name} missing in one rollout", 422, ["same fields", f"rollouts.1.{name}"], body))
    # Fields the reward needs but the request lacks.
    for reward_type, fields, missing in [("cosine", ("tokens",), "rollout_hidden"),
                                         ("binary", ("hidden",), "rollout_tokens"),
                                         ("hybrid", ("text",), "ground_truth_hidden"),
                                         ("qa_f1", ("tokens", "hidden"), "rollout_text"),
                                         ("substring_match", ("hidden",), "reference_texts")]:
        for _ in range(4):
            add(Case(f"{reward_type} without {missing}", 400, [missing, reward_type],
                     {"reward_type": reward_type, "rollouts": rollouts(fields)}))
    # Over the limits.
    for extra in range(1, 6):
        many = (rollouts() * MAX_BATCH)[: MAX_BATCH + extra]
        add(Case(f"{MAX_BATCH + extra} rollouts", 422, ["rollouts", f"at most {MAX_BATCH}"],
                 request_with(rollouts=many)))
    for extra in range(1, 6):
        k = MAX_K + extra
        item = {"rollout_tokens": [1] * k, "ground_truth_tokens": [1] * k}
        add(Case(f"k = {k}", 422, ["rollouts.0.rollout_tokens", f"at most {MAX_K}"],
                 {"reward_type": "binary", "rollouts": [item]}))
    for extra in range(1, 6):
        dim = MAX_DIM + extra
        item = {"rollout_hidden": [[0.1] * dim], "ground_truth_hidden": [[0.1] * dim]}
        add(Case(f"D = {dim}", 422, ["rollouts.0.rollout_hidden.0", f"at most {MAX_DIM}"],
                 {"reward_type": "cosine", "rollouts": [item]}))
    add(Case("long text", 422, ["rollouts.0.rollout_text", f"at most {MAX_TEXT}"],
             {"reward_type": "qa_f1", "rollouts": [{"rollout_text": "a" * (MAX_TEXT + 1), "reference_texts": ["a"]}]}))
    add(Case("many references", 422, ["rollouts.0.reference_texts", f"at most {MAX_REFERENCES}"],
             {"reward_type": "qa_f1", "rollouts": [{"rollout_text": "a", "reference_texts": ["a"] * 9}]}))
    # Huge bodies: declared by Content-Length, and streamed in chunks without one.
    for _ in range(15):
        size = rng.randint(MAX_BODY + 1, 4 * MAX_BODY)
        add(Case(f"{size}-byte body", 413, ["too large", str(MAX_BODY)], raw=b" " * (size - 2) + b"{}"))
    for _ in range(10):
        size = rng.randint(MAX_BODY + 1, 3 * MAX_BODY)
        add(Case(f"{size}-byte chunked body", 413, ["too large"], raw=b" " * size, chunked=True))
    # Invalid JSON.
    valid = json.dumps(request_with()).encode()
    for _ in range(60):
        cut = rng.randint(1, len(valid) - 1)
        add(Case(f"JSON cut at {cut}", 422, ["invalid json"], raw=valid[:cut]))
    for raw in [b"{", b"}", b"{'reward_type': 'cosine'}", b'{"reward_type": "cosine",}', b"nul", b"\xff\xfe\xfd",
                b'{"reward_type": "cosine", "rollouts": [}', b"[" * 20_000, b'{"a": ' + b"9" * 5000 + b"}",
                b'{"reward_type": "co\xffsine"}', b"\x00\x01", b'{"a": 1} trailing']:
        add(Case(f"invalid JSON {raw[:20]!r}", 422, ["invalid json"], raw=raw))
    # Wrong content types.
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/xml", "application/jsonx", "text/json"]:
        for _ in range(3):
            add(Case(f"content type {content_type}", 415, ["content-type", "application/json"],
                     raw=json.dumps(request_with()).encode(), headers={"content-type": content_type}))
    add(Case("no content type", 415, ["content-type"], raw=json.dumps(request_with()).encode(), headers={}))
    for encoding in ["gzip", "br", "deflate", "GZIP, identity"]:  # a compressed body was "invalid JSON"
        add(Case(f"content encoding {encoding}", 415, ["content-encoding", encoding],
                 raw=gzip.compress(json.dumps(request_with()).encode()),
                 headers={"content-type": "application/json", "content-encoding": encoding}))
    # Wrong methods and paths.
    for method in ["GET", "PUT", "DELETE", "PATCH"]:
        add(Case(f"{method} /v1/score", 405, ["method not allowed"], method=method, body=request_with()))
    for path in ["/v1/scores", "/score", "/v2/score", "/v1/score/x"]:
        add(Case(f"POST {path}", 404, ["not found"], path=path, body=request_with()))
    rng.shuffle(cases)
    return cases


def send(client: httpx.Client, case: Case) -> httpx.Response:
    content = case.raw if case.raw is not None else json.dumps(case.body).encode()
    if case.chunked:
        pieces = [content[i:i + 8192] for i in range(0, len(content), 8192)]
        return client.request(case.method, case.path, content=iter(pieces), headers=case.headers)
    return client.request(case.method, case.path, content=content, headers=case.headers)


def test_malformed_requests_get_a_4xx_naming_the_problem(client):
    cases = malformed_cases(random.Random(2602))
    assert len(cases) >= 500
    failures = []
    for case in cases:
        response = send(client, case)
        problem = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != case.status:
            problem = f"status {response.status_code}, expected {case.status}"
        elif not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body.get("detail"):
            problem = "no JSON error body"
        else:
            text = response.text.lower()
            missing = [word for word in case.words if word.lower() not in text]
            if missing:
                problem = f"error does not name {missing}"
        if problem:
            failures.append(f"{case.name}: {problem}: {response.text[:300]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:20])
    # The server is still up and still right.
    assert client.get("/healthz").status_code == 200
    check_correct_requests(client)


def test_a_body_declared_identity_encoded_is_scored(client):
    response = client.post("/v1/score", content=json.dumps(request_with()).encode(),
                           headers={"content-type": "application/json", "content-encoding": "identity"})
    assert response.status_code == 200, response.text


# sys.exit() in a plugin ends no server; a ValueError (torch raises many) is the plugin's fault, not the request's.
@pytest.mark.parametrize("error", [RuntimeError, ValueError, SystemExit])
def test_a_failing_reward_plugin_is_a_json_500_and_the_server_keeps_serving(client, error):
    def faulty(inputs: RewardInputs) -> torch.Tensor:
        raise error("plugin bug")

    register_reward("test_faulty")(faulty)
    try:
        # Repeated on one keep-alive connection: an answer sent just before the server drops the
        # connection would be lost to a reset now and then.
        for _ in range(50):
            response = client.post("/v1/score", json={"reward_type": "test_faulty", "rollouts": rollouts()})
            assert response.status_code == 500
            assert f"internal error ({error.__name__})" in response.json()["error"]
            assert client.get("/healthz").status_code == 200
    finally:
        unregister_reward("test_faulty")
    check_correct_requests(client)


def test_a_reward_that_reads_no_field_scores_every_rollout(client):
    """A reward may read nothing (a constant baseline): rollouts that give no field still count, one score each."""
    register_reward("test_constant")(lambda inputs: torch.full((inputs.num_rollouts,), 0.25))
    try:
        response = client.post("/v1/score", json={"reward_type": "test_constant", "rollouts": [{}, {}, {}]})
        assert response.status_code == 200 and response.json()["rewards"] == [0.25] * 3, response.text
    finally:
        unregister_reward("test_constant")


def test_a_refused_value_is_named_with_its_field(client):
    cases = [
        ({"rollout_tokens": [-1, 2], "ground_truth_tokens": [1, 2]},
         "rollouts.0.rollout_tokens.0: Input should be greater than or equal to 0 (got -1)"),
        ({"rollout_tokens": ["x", 2], "ground_truth_tokens": [1, 2]},
         "rollouts.0.rollout_tokens.0: Input should be a valid integer (got 'x')"),
    ]
    for row, error in cases:
        response = client.post("/v1/score", json={"reward_type": "binary", "rollouts": [row]})
        assert response.status_code == 422 and response.json()["error"] == error, response.text
    response = client.post("/v1/score", json={"reward_type": "binary", "rollouts": "abc", "dtype": "float16"})
    assert response.json()["error"] == ("rollouts: Input should be a valid list (got 'abc'); "
                                        "dtype: Input should be 'float32' or 'float64' (got 'float16')"), response.text
    # A missing field is named alone (its input would be the whole object), a value our checks name only once.
    response = client.post("/v1/score", json={"rollouts": rollouts()})
    assert response.json()["error"] == "reward_type: Field required", response.text
    response = client.post("/v1/score", json=request_with("nope"))
    assert response.json()["error"].count("'nope'") == 1, response.text
    response = client.post("/v1/score", json={"reward_type": "qa_f1", "rollouts": [
        {"rollout_text": "a", "reference_texts": ["  "]}]})
    assert response.json()["error"] == ("rollouts.0.reference_texts.0: a gold answer must not be empty or whitespace "
                                        "only, got '  '"), response.text


@pytest.mark.parametrize(("output", "error"), [
    (lambda count: torch.zeros(count, dtype=torch.complex64),
     "reward 'test_bad_output' must return real scores, got dtype torch.complex64"),
    (lambda count: torch.full((count,), float("nan")), "reward 'test_bad_output' output contains NaN or Inf"),
    (lambda count: torch.zeros(count + 1), "reward 'test_bad_output' must return a tensor of shape [2], got (3,)"),
    (lambda count: [0.0] * count, "reward 'test_bad_output' must return a tensor of shape [2], got list"),
], ids=["complex", "nan", "count", "list"])
def test_a_reward_plugin_returning_no_scores_is_a_500_naming_what_it_returned(client, output, error):
    """The reward function's fault, not the request's: a 500 that says what it returned, not a 400."""
    register_reward("test_bad_output")(lambda inputs: output(inputs.num_rollouts))
    try:
        before = _scored_batches(client)
        response = client.post("/v1/score", json={"reward_type": "test_bad_output", "rollouts": rollouts()})
        assert response.status_code == 500 and response.json()["error"] == f"server: {error}", response.text
        assert _scored_batches(client) == before  # not counted as scored
    finally:
        unregister_reward("test_bad_output")
    check_correct_requests(client)


def test_liveness_metrics_and_reward_list_answer_while_every_scoring_thread_is_busy():
    """Scoring runs in a pool of 40 threads; /healthz, /metrics and /v1/rewards answer on the event loop, so a
    probe gets its answer at once even when every thread is busy with a slow reward."""
    release, entered, lock = threading.Event(), [0], threading.Lock()

    def stuck(inputs: RewardInputs) -> torch.Tensor:
        with lock:
            entered[0] += 1
        release.wait(60)
        return torch.zeros(inputs.num_rollouts)

    register_reward("test_stuck")(stuck)
    try:
        with serving(create_app()) as http:
            body = {"reward_type": "test_stuck", "rollouts": rollouts(("tokens",))}
            with httpx.Client(base_url=http.base_url, timeout=60,
                              limits=httpx.Limits(max_connections=64)) as busy:
                threads = [threading.Thread(target=busy.post, args=("/v1/score",), kwargs={"json": body})
                           for _ in range(48)]
                for thread in threads:
                    thread.start()
                deadline = time.monotonic() + 30
                while entered[0] < 40:  # the pool is full; 8 requests wait for a thread
                    assert time.monotonic() < deadline, f"only {entered[0]} requests reached the reward"
                    time.sleep(0.01)
                try:
                    for path in ("/healthz", "/metrics", "/v1/rewards"):
                        assert http.get(path, timeout=5).status_code == 200, path
                finally:
                    release.set()
                    for thread in threads:
                        thread.join(timeout=60)
            assert entered[0] == 48
    finally:
        release.set()
        unregister_reward("test_stuck")


def test_hybrid_in_float64_adds_the_token_match_at_full_precision(client):
    row = {"rollout_tokens": [1, 2, 3], "ground_truth_tokens": [1, 5, 6],
           "rollout_hidden": [[1.0, 2.0]] * 3, "ground_truth_hidden": [[1.0, 2.0]] * 3}
    response = client.post("/v1/score", json={"reward_type": "hybrid", "dtype": "float64", "rollouts": [row]})
    assert response.json()["rewards"] == [1 + 1 / 3]


@pytest.mark.parametrize("dtype, value", [("float64", 1e200), ("float32", 1e30)])
def test_cosine_of_huge_finite_hidden_states_is_right(client, dtype, value):
    huge = [[value, value]]
    for truth, expected in [(huge, 1.0), ([[-value, -value]], -1.0)]:
        response = client.post("/v1/score", json={"reward_type": "cosine", "dtype": dtype, "rollouts": [
            {"rollout_hidden": huge, "ground_truth_hidden": truth}]})
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == pytest.approx([expected])


def test_hidden_states_are_scored_in_the_requests_dtype(client, make_batch):
    """float32 (the default) gives the reward replicas' rewards of float32 hidden states bit for bit;
    float64 the float64 ones. Either way a batch counts as scored."""
    source = make_batch(seed=3, docs=2, chunks=2, samples=2, k=5, dim=MAX_DIM)
    as_float64 = source.model_copy(update={"rollout_hidden": source.rollout_hidden.double(),
                                           "ground_truth_hidden": source.ground_truth_hidden.double()})
    rows = [{name: getattr(source, name)[row].tolist() for name in
             ("rollout_tokens", "ground_truth_tokens", "rollout_hidden", "ground_truth_hidden")}
            for row in range(source.num_rollouts)]
    before = _scored_batches(client)
    for reward_type in ("cosine", "hybrid"):
        for dtype, batch, extra in [("float32", source, {}), ("float32", source, {"dtype": "float32"}),
                                    ("float64", as_float64, {"dtype": "float64"})]:
            response = client.post("/v1/score", json={"reward_type": reward_type, "rollouts": rows, **extra})
            assert response.status_code == 200, response.text
            served = torch.tensor(response.json()["rewards"], dtype=torch.float64)
            replica = score_batch(batch, reward_type).rewards
            assert replica.dtype == getattr(torch, dtype)
            assert torch.equal(served, replica.double()), (reward_type, dtype)
    assert _scored_batches(client) == before + 6


def _scored_batches(client: httpx.Client) -> float:
    lines = [line for line in client.get("/metrics").text.splitlines()
             if line.startswith("refine_scored_batches_total")]
    return float(lines[0].split()[-1])


def test_a_dtype_other_than_float32_or_float64_or_a_value_beyond_it_is_refused(client):
    response = client.post("/v1/score", json=request_with(dtype="float16"))
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "dtype", response.text
    huge = {"rollout_hidden": [[1.0, 2.0]], "ground_truth_hidden": [[1.0, -1e300]]}
    response = client.post("/v1/score", json={"reward_type": "cosine", "rollouts": [huge]})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == ("rollouts.0.ground_truth_hidden.0.1: -1e+300 is outside the range of dtype "
                                        "'float32': send \"dtype\": \"float64\"")
    schema = client.get("/openapi.json").json()
    request = next(value for key, value in schema["components"]["schemas"].items() if "ScoreRequest" in key)
    assert request["properties"]["dtype"]["enum"] == ["float32", "float64"]
    assert request["properties"]["dtype"]["default"] == "float32"
    assert "dtype" in schema["info"]["description"]


def test_an_empty_gold_answer_is_refused_not_scored_as_correct(client):
    response = client.post("/v1/score", json={"reward_type": "substring_match", "rollouts": [
        {"rollout_text": "zzz", "reference_texts": [""]}]})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == (
        "rollouts.0.reference_texts.0: a gold answer must not be empty or whitespace only, got ''")


def test_command_line_refuses_bad_limits(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--max-batch", "0"])
    assert info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line == "python -m reward: error: --max-batch: Input should be greater than or equal to 1, got 0"
    with pytest.raises(SystemExit):
        main(["--port", "70000"])


@pytest.mark.parametrize("flag", ["--max-batch", "--max-rollout-len", "--max-hidden-dim", "--max-text-chars",
                                  "--max-references", "--max-body-bytes", "--max-inflight-bytes",
                                  "--max-body-seconds"])
def test_command_line_refuses_limits_past_their_bound_naming_the_flag(capsys, flag):
    """10**23 failed building the request schema (64-bit integers) with a traceback."""
    with pytest.raises(SystemExit) as info:
        main([flag, str(10**23)])
    assert info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith(f"python -m reward: error: {flag}: Input should be less than or equal to ")


def test_command_line_refuses_an_empty_host(capsys):
    """uvicorn would bind every interface for it, where the server stays on loopback unless told otherwise."""
    with pytest.raises(SystemExit) as info:
        main(["--host", ""])
    assert info.value.code == 2
    assert "--host must name an address (0.0.0.0 for every interface), got ''" in capsys.readouterr().err


def test_command_line_imports_reward_modules_first(capsys, tmp_path, monkeypatch):
    (tmp_path / "scratch_http_rewards.py").write_text(
        "import torch\n"
        "from refine.algorithm.rewards import register_reward\n\n"
        "register_reward('test_http_plugin')(lambda inputs: torch.ones(inputs.num_rollouts))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "scratch_http_rewards", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["--reward-module", "no_such_rewards_module"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m reward: error: --reward-module: cannot import 'no_such_rewards_module': ModuleNotFoundError: "
        "No module named 'no_such_rewards_module'")
    served = []
    monkeypatch.setattr("reward.__main__.serve", lambda **options: served.append(available_rewards()))
    try:
        main(["--reward-module", "scratch_http_rewards", "--port", "8123"])
        assert "test_http_plugin" in served[0]
    finally:
        unregister_reward("test_http_plugin")
        sys.modules.pop("scratch_http_rewards", None)


# ------------------------------------------------------------------------ what a client can make the server hold


def test_a_body_of_many_bad_values_or_keys_is_refused_with_few_errors(client):
    """Pydantic reported every bad value and every unknown key: 30 MB of them took 10 GB and two minutes."""
    bad = {"rollout_hidden": [["x"] * MAX_DIM] * MAX_K, "ground_truth_hidden": [["x"] * MAX_DIM] * MAX_K}
    response = client.post("/v1/score", json={"reward_type": "cosine", "rollouts": [bad] * MAX_BATCH})
    assert response.status_code == 422, response.text
    assert [item["field"] for item in response.json()["detail"]] == [
        "rollouts.0.rollout_hidden.0.0", "rollouts.0.ground_truth_hidden.0.0"]
    many = {f"k{i}": 0 for i in range(5000)}
    for body, where in [({"reward_type": "cosine", "rollouts": [many]}, "rollouts.0"),
                        ({"reward_type": "cosine", "rollouts": rollouts(), **many}, "body")]:
        response = client.post("/v1/score", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == (f"{where}: a JSON object of {len(body) if where == 'body' else 5000} "
                                            f"keys, more than the 64 any object of this API may hold")
    check_correct_requests(client)


def test_a_request_http_cannot_parse_gets_a_json_400_naming_the_header():
    """uvicorn answered `Content-Length: -1` in plain text, not in the JSON of every other error."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "reward", "--port", str(port), "--log-level", "critical"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "python -m reward did not start"
                time.sleep(0.1)
        cases = [
            ("Content-Length: -1", "header.content-length", "invalid HTTP request: bad Content-Length, got '-1'"),
            ("Content-Length: 5\r\nContent-Length: 6", "header.content-length",
             "invalid HTTP request: conflicting Content-Length headers, got '5', '6'"),
            ("Transfer-Encoding: gzip", "header.transfer-encoding",
             "invalid HTTP request: Only Transfer-Encoding: chunked is supported, got 'gzip'"),
        ]
        for header, where, msg in cases:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(head(None)[:-2] + header.encode() + b"\r\n\r\n{}")
                status, headers, body = read_response(sock)
            assert status == 400 and headers["content-type"] == "application/json", body
            assert json.loads(body) == {"error": f"{where}: {msg}", "detail": [
                {"loc": where.split("."), "field": where, "msg": msg, "type": "http_invalid"}]}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"NOT HTTP\r\n\r\n")
            status, headers, body = read_response(sock)
        error = json.loads(body)["error"]
        assert status == 400 and error.startswith("request: invalid HTTP request: illegal request line") and \
            "NOT HTTP" in error, body
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_command_line_names_a_host_or_port_it_cannot_listen_on(capsys, monkeypatch):
    """uvicorn said "[Errno -2] Name or service not known", naming neither the flag nor the value."""
    monkeypatch.setattr("reward.__main__.serve", lambda **options: pytest.fail(f"served {options}"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv, error in [
            (["--host", "999.1.1.1"], "--host must be an IP address or a host name that resolves, got '999.1.1.1' "
                                      "(Name or service not known)"),
            (["--host", "192.0.2.1"], "--host '192.0.2.1' is not an address of this machine (Cannot assign "
                                      "requested address)"),
            (["--port", str(port)], f"--port: cannot listen on port {port} of '127.0.0.1' (Address already in "
                                    f"use)"),
        ]:
            with pytest.raises(SystemExit) as info:
                main(argv)
            assert info.value.code == 2
            assert capsys.readouterr().err.splitlines()[-1] == f"python -m reward: error: {error}"


def test_command_line_refuses_an_inflight_bound_below_one_body(capsys):
    """Every request of max_body_bytes would be answered 503, "retry later", for ever."""
    with pytest.raises(SystemExit) as info:
        main(["--max-body-bytes", "4096", "--max-inflight-bytes", "2048"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m reward: error: --max-inflight-bytes: must be at least max_body_bytes (4096), the size of one "
        "request, got 2048")
