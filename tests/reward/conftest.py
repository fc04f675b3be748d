"""Fixtures for the reward service tests: its HTTP API served with small limits (the helpers are in
http_helpers.py)."""

from collections.abc import Iterator

import httpx
import pytest

from http_helpers import MAX_BATCH, MAX_BODY, MAX_DIM, MAX_K, MAX_REFERENCES, MAX_TEXT, serving
from reward.http import create_app


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    app = create_app(max_batch=MAX_BATCH, max_rollout_len=MAX_K, max_hidden_dim=MAX_DIM,
                     max_text_chars=MAX_TEXT, max_references=MAX_REFERENCES, max_body_bytes=MAX_BODY)
    with serving(app) as http:
        yield http
