"""Where a run's actors go on the Ray cluster (a real local Ray): a request no node can hold is refused before
anything starts, and an actor waiting for room on a node is said so once, waited for and never restarted for it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from refine.config import RunConfig, run_tokenizer
from services import orchestrator as orchestrator_module
from services.orchestrator import Member, Orchestrator, ServiceError
from services.ray_runtime import Placement, check_placement, free_per_node
from services.streams import DOCUMENTS, ROLLOUT_GROUP

WAITING = "is waiting for Ray to place it"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray for this module (ports Ray picks, never 6379), unless one is running already."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def full_cluster(local_ray: None) -> Iterator[Placement]:
    """Every CPU of the (one-node) cluster reserved: a further request is feasible but waits for room. The whole
    node's, not what is free now: what an earlier test gives back late would make room."""
    assert len([node for node in ray.nodes() if node["Alive"]]) == 1
    blocker = Placement("blocker", {"num_cpus": ray.cluster_resources()["CPU"]})
    assert blocker.group.wait(30)
    yield blocker
    blocker.release()


def _node(cpus: float, gpus: float = 0.0, alive: bool = True, address: str = "10.0.0.1") -> dict[str, Any]:
    """A node as ray.nodes() lists it."""
    resources = {"CPU": cpus, "memory": 8e9, f"node:{address}": 1.0}
    if gpus:
        resources["GPU"] = gpus
    return {"NodeID": address, "Alive": alive, "NodeManagerAddress": address, "Resources": resources}


def test_a_request_no_node_can_hold_is_refused_naming_the_field_and_the_largest_node() -> None:
    config = RunConfig()
    nodes = [_node(2.0), _node(1.0, address="10.0.0.2"), _node(16.0, alive=False, address="10.0.0.3")]
    config.service.worker_cpus = 1.5  # the cluster's 3 CPUs suffice, and the 2-CPU node holds one
    check_placement(config, nodes)
    config.service.worker_cpus = 3.0  # the cluster's totals suffice for one worker, no node does
    with pytest.raises(ValueError) as info:
        check_placement(config, nodes)
    assert str(info.value) == ("no node of the Ray cluster can hold a rollout worker: service.worker_cpus=3.0 asks "
                               "for that many CPUs; Ray places an actor on one node, and the largest has 2 CPUs")


def test_a_cuda_learner_needs_a_node_with_a_cpu_and_a_gpu() -> None:
    config = RunConfig()
    config.train.device = "cuda"
    gpu_node = _node(0.5, gpus=1.0, address="10.0.0.2")  # a GPU, but not the learner's CPU beside it
    with pytest.raises(ValueError, match=r"hold a learner rank: 1 CPU, 1 GPU \(train.device='cuda' gives each rank a "
                                         r"GPU\); Ray places an actor on one node, and the largest has 0.5 CPUs, 1 GPU"):
        check_placement(config, [_node(8.0), gpu_node])
    check_placement(config, [_node(8.0), _node(2.0, gpus=1.0)])


def test_the_check_reads_the_nodes_ray_gives(local_ray: None) -> None:
    config = RunConfig()
    check_placement(config, ray.nodes())
    largest = max(node["Resources"]["CPU"] for node in ray.nodes() if node["Alive"])
    config.service.worker_cpus = largest + 1
    with pytest.raises(ValueError, match=rf"service.worker_cpus={largest + 1} asks for that many CPUs; .* the largest "
                                         rf"has {largest:g} CPUs"):
        check_placement(config, ray.nodes())


def test_free_per_node_takes_the_placed_bundles_off_each_node() -> None:
    nodes = [_node(2.0), _node(1.0, address="10.0.0.2")]
    groups = {
        "a": {"state": "CREATED", "bundles": {0: {"CPU": 1.25}}, "bundles_to_node_id": {0: "10.0.0.1"}},
        "b": {"state": "PENDING", "bundles": {0: {"CPU": 1.5}}, "bundles_to_node_id": {0: ""}},
    }
    free = free_per_node(nodes, groups, available={"CPU": 1.75})
    assert [(address, room["CPU"]) for address, room, _ in free] == [("10.0.0.1", 0.75), ("10.0.0.2", 1.0)]


def test_an_actor_waiting_for_room_is_said_so_once_with_what_it_asks_and_what_nodes_have(
    full_cluster: Placement,
) -> None:
    waiting = Placement("rollout_worker-0.0", {"num_cpus": 0.5})
    try:
        assert not waiting.placed()
        assert waiting.waiting_note(grace_s=0.5) is None  # within the grace: placing may take a moment
        time.sleep(0.6)
        note = waiting.waiting_note(grace_s=0.5)
        assert note is not None
        address = ray.nodes()[0]["NodeManagerAddress"]
        assert note.startswith(f"rollout_worker-0.0 {WAITING} (1s so far): it asks for 0.5 CPUs on one node; "
                               f"free now: {address} 0 of ")
        assert waiting.waiting_note(grace_s=0.5) is None  # one line, not one per check
        full_cluster.release()  # room on the node: Ray places it
        assert waiting.group.wait(10) and waiting.placed()
    finally:
        waiting.release()


@pytest.fixture
def orchestrator(redis_url: str, tmp_path: Path, local_ray: None) -> Iterator[Orchestrator]:
    """A run's orchestrator, without its learner: its supervision and start waits are driven by the test."""
    config = RunConfig()
    config.train.out_dir = str(tmp_path / "run")
    config.service.metrics_discovery_dir = str(tmp_path / "discovery")
    config.service.heartbeat_timeout_s = 3.0
    config.service.namespace = f"test-placement-{time.monotonic_ns()}"
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, config.service.namespace, resume=False,
                                progress=False)
    orchestrator.placement_grace_s = 0.5
    orchestrator.broker.ensure_group(DOCUMENTS, ROLLOUT_GROUP, start_id="0")
    orchestrator.events_file = (tmp_path / "events.jsonl").open("w")
    yield orchestrator
    orchestrator._shutdown()  # kills the actors and gives their placements back


def _silent_actor() -> Callable[[str, Placement], Any]:
    """A member that never beats (its class is defined here: Ray's workers cannot import this test module)."""
    class Silent:
        def run(self) -> str:
            time.sleep(120)
            return ""

        def answer(self) -> str:
            return json.dumps({"answer": 42})

    silent = ray.remote(Silent)
    return lambda member_id, placement: silent.options(num_cpus=0.5, scheduling_strategy=placement.strategy()).remote()


def _supervise_until(orchestrator: Orchestrator, done: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        orchestrator._supervise()
        time.sleep(0.1)


def test_a_member_waiting_for_room_is_not_restarted_and_its_start_timeout_counts_from_its_placement(
    orchestrator: Orchestrator, full_cluster: Placement, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(orchestrator_module, "ACTOR_START_TIMEOUT_S", 1.0)  # with heartbeat_timeout_s: 3s to beat
    member = Member("rollout_worker", 0, DOCUMENTS, ROLLOUT_GROUP, _silent_actor(),
                    Placement("rollout_worker-0", {"num_cpus": 0.5}))
    orchestrator.members.append(member)
    member.start()
    # Unplaced past the heartbeat grace: said once, never restarted (a replacement would wait the same).
    _supervise_until(orchestrator, lambda: False, seconds=3.5)
    assert member.incarnation == 0 and not orchestrator.restarts
    notes = [record.message for record in caplog.records if WAITING in record.message]
    assert len(notes) == 1 and notes[0].startswith(f"rollout_worker-0.0 {WAITING} (")
    assert "it asks for 0.5 CPUs on one node; free now: " in notes[0]
    # Placed, it is supervised as before: it never beats, so it is restarted, 3s after its placement.
    full_cluster.release()
    _supervise_until(orchestrator, member.placement.placed, seconds=10)
    placed = time.monotonic()
    _supervise_until(orchestrator, lambda: member.incarnation > 0, seconds=10)
    assert member.incarnation == 1 and time.monotonic() - placed >= 3.0
    assert any("rollout_worker-0.0 restarted as rollout_worker-0.1: it never sent a heartbeat in 3s" in record.message
               for record in caplog.records)


def test_the_learner_start_waits_for_room_without_counting_it(
    orchestrator: Orchestrator, full_cluster: Placement, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(orchestrator_module, "ACTOR_START_TIMEOUT_S", 2.5)
    placement = orchestrator._place_learner("learner")
    learner = _silent_actor()("learner", placement)
    threading.Timer(3.0, full_cluster.release).start()  # unplaced for longer than the start timeout
    assert json.loads(orchestrator._await_start(learner.answer.remote(), [placement])) == {"answer": 42}
    assert [record.message.split(" (")[0] for record in caplog.records if WAITING in record.message] == [
        f"learner {WAITING}"]


def test_a_placed_learner_that_does_not_answer_times_out_from_its_placement(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(orchestrator_module, "ACTOR_START_TIMEOUT_S", 1.0)
    placement = orchestrator._place_learner("learner")
    learner = _silent_actor()("learner", placement)
    learner.run.remote()  # busy: the answer never comes
    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"the learner did not start within 1s of its placement"):
        orchestrator._await_start(learner.answer.remote(), [placement])
    assert time.monotonic() - started < 5
