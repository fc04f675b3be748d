"""The checks a service run passes before Ray and Redis start (services/run_checks.py)."""

import json
import logging
import re

import pytest

from refine.config import load_config, run_tokenizer
from services.namespace_claim import claim_ttl_s, key_ttl_s
from services.run_checks import check_data_source, check_service_config


def test_the_first_batch_check_leaves_the_data_report_to_the_runs_own_stream(tmp_path, caplog):
    """The check reads the run's first batch, as the orchestrator's stream then does again: each said what it
    dropped, so a service run printed every data warning twice."""
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["short", "x" * 80, "y" * 80]))
    config = load_config(None, [f"data.source={source}", "data.min_length=40", "data.seq_len=64"])
    caplog.set_level(logging.INFO, logger="refine.data.stream")
    check_data_source(config, run_tokenizer(config))
    assert [record for record in caplog.records if record.name == "refine.data.stream"] == []
    assert logging.getLogger("refine.data.stream").level == logging.INFO  # as it was


def test_a_key_ttl_below_the_namespace_claim_and_a_refresh_is_refused_naming_them():
    """Keys that expire before the claim lapses: a driver that still holds its namespace (riding out a Redis outage,
    stopping slowly) would find its streams and weights gone. Refreshed a minute apart, they may be a minute old."""
    config = load_config(None, ["service.key_ttl_s=209.5"])
    assert claim_ttl_s(config) == 150  # max(60, 4 x 30) + 30
    error = ("service.key_ttl_s=209.5 is shorter than the run's claim on its Redis namespace and a refresh of its "
             "keys' expiry (210s: max(60, 4 x service.heartbeat_timeout_s=30) + 30, plus 60): a driver that still "
             "holds its namespace would lose its keys; set it to 210 or more, or leave it out")
    with pytest.raises(ValueError, match=re.escape(error)):
        check_service_config(config)
    config = load_config(None, ["service.key_ttl_s=210"])
    check_service_config(config)
    assert key_ttl_s(config) == 210


def test_the_default_key_ttl_is_an_hour_or_the_shortest_allowed_when_longer():
    config = load_config(None, [])
    assert config.service.key_ttl_s is None
    assert key_ttl_s(config) == 3600
    long_heartbeat = load_config(None, ["service.heartbeat_timeout_s=1000"])
    check_service_config(long_heartbeat)
    assert key_ttl_s(long_heartbeat) == claim_ttl_s(long_heartbeat) + 60 == 4090
