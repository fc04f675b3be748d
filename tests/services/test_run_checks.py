"""The checks a service run passes before Ray and Redis start (services/run_checks.py)."""

import json
import logging

from refine.config import load_config, run_tokenizer
from services.run_checks import check_data_source


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
