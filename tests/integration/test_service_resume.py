"""Fault: the run is stopped (as on Ctrl-C), or its driver dies, and it is resumed from the learner's checkpoint."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import ray

from learner.checkpoint import latest_checkpoint, read_learner_state
from refine.cli import main
from refine.config import run_tokenizer
from refine.data.stream import document_batches
from refine.loop import RunInterrupted
from service_helpers import SERVICE_TINY, run_in_background, step_rows, tiny_config, tiny_overrides, wait_for
from services.broker import Broker
from services.failures import ServiceError
from services.orchestrator import Orchestrator, run
from services.progress import read_progress
from services.redis_server import EmbeddedRedis, connect
from services.streams import LEARNER_REPORTS

pytestmark = pytest.mark.slow


def test_stopped_learner_resumes_exactly(ray_session, tmp_path: Path, monkeypatch) -> None:
    steps, stop_at = 5, 2
    # Six documents: the stream wraps around, so the resumed run must also count passes right.
    reference = tiny_config(tmp_path / "a", f"train.steps={steps}", "train.checkpoint_every=0", "data.num_documents=6")
    run(reference, progress=False)
    uninterrupted = {row["step"]: row for row in step_rows(tmp_path / "a" / "run")}

    config = tiny_config(tmp_path / "b", f"train.steps={steps}", "train.checkpoint_every=0", "data.num_documents=6")
    # The driver (in this process) publishes only the first `stop_at` document batches until the stop: the
    # learner cannot run ahead of the test, however fast it trains, and stops with steps left to resume.
    publish_next = Orchestrator._publish_next

    def publish_first_batches_only(self: Orchestrator) -> None:
        if self.published < stop_at:
            publish_next(self)

    monkeypatch.setattr(Orchestrator, "_publish_next", publish_first_batches_only)
    redis_server = EmbeddedRedis().start()
    try:
        broker = Broker(connect(redis_server.url), config.service.namespace)
        thread, outcome = run_in_background(config, redis_url=redis_server.url)

        def finished_published_batches() -> bool:
            assert thread.is_alive(), outcome.get("error")
            progress = read_progress(broker)
            return progress is not None and progress.finished >= stop_at

        wait_for(finished_published_batches, f"the learner finishing the {stop_at} batches published",
                 timeout_s=120.0, poll_s=0.02)
        broker.request_stop("test")  # as Ctrl-C does: the learner checkpoints and every role exits
        thread.join(timeout=120)
        assert not thread.is_alive(), "the stopped run did not end"
        assert "error" not in outcome, outcome.get("error")
    finally:
        redis_server.stop()
        monkeypatch.undo()  # the resumed run publishes as usual
    stopped_at = outcome["stats"]["step"]
    assert stopped_at == stop_at  # every published batch trained (none dropped), and nothing after the stop
    stopped_rows = step_rows(tmp_path / "b" / "run")
    assert len(stopped_rows) == stopped_at

    stats = run(config, resume=True, progress=False)
    rows = step_rows(tmp_path / "b" / "run")
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert rows[:stopped_at] == stopped_rows  # resumed after them (a run started over would write them anew)
    assert stats["step"] == steps
    for row in rows:
        # Same documents, same rollouts (seeded per batch), same weights and optimizer state.
        same = uninterrupted[row["step"]]
        assert (row["data_epoch"], row["cursor"]) == (same["data_epoch"], same["cursor"])
        assert row["loss"] == same["loss"], f"step {row['step']}"
        assert row["reward_mean"] == same["reward_mean"]


@pytest.mark.parametrize("shuffle", [False, True], ids=["source_order", "shuffled"])
def test_a_service_run_over_long_documents_trains_their_windows_and_resumes_inside_one(ray_session, tmp_path: Path,
                                                                                      shuffle: bool) -> None:
    """The service carries the data cursor as the local loop does, windows inside documents and shuffled
    passes included: a run resumed after step 1, inside the first document, trains the same batches as the
    local stream."""
    source = tmp_path / "long.jsonl"
    # With BOS 497, 551 and 605 tokens: three windows of data.seq_len=192 each (the last one's rest cut).
    source.write_text("".join(json.dumps({"text": f"record {i}: " + "lorem ipsum dolor sit amet " * (18 + 2 * i)})
                              + "\n" for i in range(3)))
    windows = (f"data.source={source}", "data.max_windows=3", "train.checkpoint_every=1", f"data.shuffle={shuffle}",
               "train.keep_checkpoints=2")
    config = tiny_config(tmp_path, "train.steps=1", *windows)
    run(config, progress=False)
    assert [row["cursor"] for row in step_rows(tmp_path / "run")] == [2]  # two windows of the first record read
    stats = run(tiny_config(tmp_path, "train.steps=5", *windows), resume=True, progress=False)
    assert stats["step"] == 5
    rows = step_rows(tmp_path / "run")
    batches = list(itertools.islice(document_batches(config, run_tokenizer(config)), 5))
    assert [(row["cursor"], row["tokens"]) for row in rows] == [
        (batch.cursor, int(batch.lengths.sum())) for batch in batches]
    if not shuffle:
        assert [row["tokens"] for row in rows] == [384, 113 + 192, 192 + 167, 384, 192 + 192]
    else:  # the records in another order (a shuffled pass keeps each record's windows together)
        assert [row["tokens"] for row in rows] != [384, 113 + 192, 192 + 167, 384, 192 + 192]
    assert [row["data_epoch"] for row in rows] == [0, 0, 0, 0, 1]  # the fifth batch wraps around the source
    # The learner keeps its newest two checkpoints beside latest (train.keep_checkpoints).
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "latest", "step-00000004", "step-00000005"]


def test_resume_after_the_driver_died_loses_nothing_and_keeps_the_run_config(ray_session, tmp_path: Path) -> None:
    run_dir, base = tmp_path / "run", ["service.mode=colocated", "train.checkpoint_every=1"]
    config = tiny_config(tmp_path, *base, "train.steps=2")
    run(config, progress=False)
    rows = step_rows(run_dir)
    last_row_lost = json.dumps(rows[0]) + "\n"  # the driver died after the checkpoint, before writing step 2

    # Nothing left to train: nothing starts (this Redis URL answers nowhere), and step 2's row comes back.
    (run_dir / "metrics.jsonl").write_text(last_row_lost)
    assert run(config, resume=True, progress=False, redis_url="redis://127.0.0.1:1/0") == rows[-1]
    assert step_rows(run_dir) == rows

    # A resume the learner refuses (another model): one line, no resume advice, config.yaml untouched.
    (run_dir / "metrics.jsonl").write_text(last_row_lost)
    saved_config = (run_dir / "config.yaml").read_text()
    with pytest.raises(ServiceError) as refused:
        run(tiny_config(tmp_path, *base, "train.steps=3", "model.hidden_size=32"), resume=True, progress=False)
    message = str(refused.value)
    assert "model.hidden_size=64" in message, message
    assert "\n" not in message and "Traceback" not in message and "--resume" not in message, message
    assert (run_dir / "config.yaml").read_text() == saved_config

    # The resume with the run's config: step 2's row restored, step 3 trained; the announcements a killed
    # driver of this run and its learner left for Prometheus are gone.
    resumed = tiny_config(tmp_path, *base, "train.steps=3")
    namespace = resumed.service.namespace
    for role, instance, port in (("orchestrator", namespace, 1), ("learner", "learner-0", 2)):
        stale = tmp_path / "prometheus" / f"{role}-{instance}-{namespace}~127.0.0.1_{port}.json"
        labels = {"role": role, "instance_id": instance, "node": "gone", "run": namespace}
        stale.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": labels}]))
    run(resumed, resume=True, progress=False)
    assert [row["step"] for row in step_rows(run_dir)] == [1, 2, 3]
    assert step_rows(run_dir)[:2] == rows
    assert list((tmp_path / "prometheus").glob("*.json")) == []


def test_a_ctrl_c_during_a_report_read_still_writes_that_report(ray_session, tmp_path: Path, monkeypatch,
                                                                caplog) -> None:
    """The signal lands after Redis delivered a learner report to the driver, before the driver wrote it: the
    graceful stop that follows still writes it, so metrics.jsonl holds every step the checkpoint holds (the entry
    stays pending for the driver's consumer, which reads only new entries)."""
    config = tiny_config(tmp_path, "train.steps=200", "train.checkpoint_every=0")
    armed: dict = {"on": False, "interrupted": None}
    consume = Broker.consume

    def interrupted_once(self: Broker, stream: str, *args, **kwargs):
        entries = consume(self, stream, *args, **kwargs)
        if stream == LEARNER_REPORTS and armed["on"] and entries:
            armed["on"], armed["interrupted"] = False, [report.step for _, report in entries]
            raise KeyboardInterrupt
        return entries

    monkeypatch.setattr(Broker, "consume", interrupted_once)
    redis_server = EmbeddedRedis().start()
    try:
        broker = Broker(connect(redis_server.url), config.service.namespace)
        thread, outcome = run_in_background(config, redis_url=redis_server.url)

        def trained_three_steps() -> bool:
            assert thread.is_alive(), outcome.get("error")
            return (getattr(read_progress(broker), "step", 0) or 0) >= 3

        wait_for(trained_three_steps, "three steps", timeout_s=120.0, poll_s=0.02)
        armed["on"] = True
        thread.join(timeout=180)
        assert not thread.is_alive(), "the interrupted run did not end"
    finally:
        redis_server.stop()
    # A clean stop that did not reach train.steps ends as an interrupted run (exit 130), not as a finished one.
    assert isinstance(outcome.get("error"), RunInterrupted), outcome.get("error")
    assert f"resume with `refine train {tmp_path / 'run' / 'config.yaml'} --resume`" in caplog.text
    assert armed["interrupted"], "no report read was interrupted"
    checkpoint = read_learner_state(latest_checkpoint(tmp_path / "run"))
    assert [row["step"] for row in step_rows(tmp_path / "run")] == list(range(1, checkpoint.step + 1))
    assert set(armed["interrupted"]) <= set(range(1, checkpoint.step + 1))


def test_a_second_ctrl_c_kills_the_run_says_how_to_resume_it_and_leaves_no_key(ray_session, redis_url: str,
                                                                                tmp_path: Path, monkeypatch, caplog,
                                                                                capsys) -> None:
    """The first Ctrl-C stops the run gracefully and says how to resume it; the second kills its actors at once, and
    said neither which step its checkpoint holds nor the command that resumes it. The run's keys go with it: a role
    Ray had not killed yet made its stream again after the run deleted its namespace."""
    overrides = [*tiny_overrides(tmp_path), "train.steps=200"]
    namespace = next(item.split("=", 1)[1] for item in overrides if item.startswith("service.namespace="))
    args = ["train", str(SERVICE_TINY), "--no-progress", "--redis-url", redis_url]
    for item in overrides:
        args += ["--set", item]
    consume, kill = Broker.consume, ray.kill
    presses: list[str] = []
    killed: list = []

    def ctrl_c(self: Broker, stream: str, *args, **kwargs):
        entries = consume(self, stream, *args, **kwargs)
        if stream == LEARNER_REPORTS and not presses and entries:  # a step reported: the first Ctrl-C
            presses.append("stop")
            raise KeyboardInterrupt
        if stream == LEARNER_REPORTS and presses == ["stop"] and getattr(read_progress(self), "done", False):
            presses.append("kill")  # the second, once the learner checkpointed and returned: its step is known
            raise KeyboardInterrupt
        return entries

    def recorded_kill(actor, *args, **kwargs) -> None:
        killed.append(actor)
        kill(actor, *args, **kwargs)

    monkeypatch.setattr(Broker, "consume", ctrl_c)
    monkeypatch.setattr(ray, "kill", recorded_kill)
    assert main(args) == 130
    assert presses == ["stop", "kill"]
    assert capsys.readouterr().err.endswith("refine: interrupted\n")
    run_dir = tmp_path / "run"
    step = read_learner_state(latest_checkpoint(run_dir)).step
    assert step >= 1 and "interrupted at step" not in caplog.text  # the graceful stop did not get to say it
    [said] = [message for message in caplog.messages if message.startswith("killed")]
    assert re.fullmatch(rf"killed at once: its last checkpoint holds step {step} of train.steps=200; resume with "
                        rf"`refine train {re.escape(str(run_dir / 'config.yaml'))} --redis-url \S+ --resume`", said), said
    for actor in killed:  # once every killed actor is gone, nothing can write to Redis any more
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=60)
    client = connect(redis_url)
    try:
        assert list(client.scan_iter(match=f"{namespace}:*")) == []
    finally:
        client.close()
