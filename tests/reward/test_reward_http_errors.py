"""The HTTP API's error handlers, served for real: an unexpected error is a JSON 500."""

from typing import Any

from http_helpers import check_correct_requests, rollouts


def test_an_unexpected_error_is_a_json_500_that_closes_its_connection(client, monkeypatch):
    """Starlette raises an unexpected error again after its 500 is sent, and uvicorn drops the connection: the
    answer says so (Connection: close), or the client's next request on it would fail."""
    import reward.http

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(reward.http, "record_scored", broken)
    response = client.post("/v1/score", json={"reward_type": "cosine", "rollouts": rollouts(("hidden",))})
    assert response.status_code == 500 and response.headers["connection"] == "close"
    assert response.json()["error"] == "server: internal error (RuntimeError)"
    monkeypatch.undo()
    check_correct_requests(client)
