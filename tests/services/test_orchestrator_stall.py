"""What a service run says when its learner takes no step (services.orchestrator `_check_stall`), on a real Redis
and without Ray."""

from __future__ import annotations

import re

import torch

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
