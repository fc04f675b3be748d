"""What a service run says when its learner takes no step (services.orchestrator `_check_stall`), on a real Redis
and without Ray."""

from __future__ import annotations

import errno
import io
import re
import sys

import pytest
import torch

import refine.runtime as runtime
from refine.config import load_config
from services.broker import Broker
from services.messages import DocumentBatch
from services.orchestrator import Orchestrator
from services.streams import DOCUMENTS, ROLLOUT_GROUP


def test_a_run_whose_learner_takes_no_step_is_said_to_stall_naming_who_holds_what(tmp_path, redis_url, namespace,
                                                                                   monkeypatch):
    """A role whose loop hangs keeps beating, so supervision never replaces it: after stall_warning_s without a
    learner step the run says where its work waits (entries not yet taken, entries held and by whom, heartbeat
    ages), again each stall_warning_s, and stops saying it once a step is taken."""
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
    said: list[str] = []
    monkeypatch.setattr(orchestrator, "_write_line", said.append)
    clock = [1000.0]
    try:
        broker = Broker(orchestrator.client, namespace)
        for index in range(3):
            broker.publish(DOCUMENTS, DocumentBatch(batch_id=f"docs-{index}", doc_ids=["d"],
                                                    token_ids=torch.ones(1, 8, dtype=torch.long),
                                                    lengths=torch.tensor([8])))
        # One taken and acknowledged (trimming keeps it: it comes after one still held), one taken by a worker
        # that hangs on it, one waiting.
        ((done, _),) = broker.consume(DOCUMENTS, ROLLOUT_GROUP, "rollout_worker-0.0", DocumentBatch, count=1)
        broker.consume(DOCUMENTS, ROLLOUT_GROUP, "rollout_worker-1.0", DocumentBatch, count=1)
        broker.ack(DOCUMENTS, ROLLOUT_GROUP, [done])
        broker.heartbeat("learner", "learner-0")  # the roles Ray runs add theirs (no Ray here)
        orchestrator.stall_warning_s = 600.0
        orchestrator._check_stall(4, clock[0])
        clock[0] += 599
        orchestrator._check_stall(4, clock[0])
        assert said == []  # not yet
        clock[0] += 2
        orchestrator._check_stall(4, clock[0])
        assert len(said) == 1
        assert re.fullmatch(r"warning: the learner has taken no step for 601s \(it is at step 4\); "
                            r"documents: 1 waiting, 1 by rollout_worker-1\.0; rollouts: 0 waiting, none held; "
                            r"scored: 0 waiting, none held; last heartbeats: learner-0 \d+s ago", said[0]), said[0]
        clock[0] += 300
        orchestrator._check_stall(4, clock[0])
        assert len(said) == 1  # said once per interval
        clock[0] += 300
        orchestrator._check_stall(4, clock[0])
        assert len(said) == 2
        orchestrator._check_stall(5, clock[0])  # a step: the clock starts over
        clock[0] += 599
        orchestrator._check_stall(5, clock[0])
        assert len(said) == 2
    finally:
        orchestrator.client.close()


class GoneReader(io.StringIO):
    """A stderr piped to a reader that goes away after its first write (`2> >(head -c 100)`): later writes raise
    BrokenPipeError."""

    def write(self, text: str) -> int:
        if self.tell():
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        return super().write(text)


@pytest.mark.parametrize("stderr", [GoneReader(), None], ids=["reader gone", "closed"])
def test_a_lost_stderr_ends_the_runs_progress_and_notes_not_the_run(tmp_path, redis_url, namespace, monkeypatch,
                                                                   stderr):
    """_write_line never raises: a BrokenPipeError there (a ConnectionError) was taken for Redis' failure, and
    raised again while the learner was let stop, killing it mid-save."""
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=True)
    monkeypatch.setattr(runtime, "PROGRESS", runtime.ProgressStream())  # lost here only
    try:
        orchestrator.out_dir.mkdir(parents=True)
        monkeypatch.setattr(sys, "stderr", stderr)
        orchestrator._open_outputs({"step": 0, "reports": 0})  # the run's progress bar
        orchestrator.bar.update(1)
        orchestrator._write_line("the run failed: waiting up to 60s for the learner to checkpoint")
        orchestrator.bar.update(1)
        orchestrator.bar.close()
        assert runtime.PROGRESS.lost
    finally:
        orchestrator.client.close()
