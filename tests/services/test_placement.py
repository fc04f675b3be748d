"""Where a run's actors go on the Ray cluster (a real local Ray): every actor's resources are reserved at once in one
placement group, which Ray places all or nothing; a run whose actors no node, or no packing onto the nodes, can hold
is refused before anything starts, and a run waiting for room is said so once, waited for and never restarted for
it."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.util import placement_group, placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup

from learner.replica import LearnerReplica
from refine.config import RunConfig, run_tokenizer
from services import orchestrator as orchestrator_module
from services import ray_runtime
from services.failures import ServiceError
from services.orchestrator import Member, Orchestrator
from services.ray_runtime import (
    Placement, Reservation, actor_requests, check_placement, first_fit_decreasing, fit_together, free_per_node,
)
from services.source_digest import SourceStamp
from services.streams import DOCUMENTS, LEARNER_REPORTS, ORCHESTRATOR_GROUP, ROLLOUT_GROUP

WAITING = "the run's actors cannot all be placed together on the Ray cluster's nodes right now"
# The local Ray's 2 CPUs hold this run's actors: learner 1, one rollout worker 0.5, one reward replica 0.25.
RUN_REQUESTS = "learner (1 CPU), rollout_worker-0 (0.5 CPUs), reward-0 (0.25 CPUs)"
# A driver's sources that no actor here has (services/source_digest.py), and what an actor then refuses with.
OTHER_SOURCES = SourceStamp(digest="0" * 64, folder="/home/me/refine", host="laptop").model_dump_json()
REFUSED = (r"this actor imports the project from \S+ \(sources \w{12}\), but the run's driver from "
           r"laptop:/home/me/refine \(sources 000000000000\): two versions of the code")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray for this module (ports Ray picks, never 6379), unless one is running already."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _block(cpus: float) -> PlacementGroup:
    """`cpus` of the cluster reserved by a placement group of another job."""
    group = placement_group([{"CPU": cpus}])
    assert group.wait(30)
    return group


@pytest.fixture
def full_cluster(local_ray: None) -> Iterator[Callable[[], None]]:
    """Every CPU of the (one-node) cluster reserved: a run's group is feasible but waits for room. The whole node's,
    not what is free now: what an earlier test gives back late would make room. Yields what frees them."""
    assert len([node for node in ray.nodes() if node["Alive"]]) == 1
    blocker = _block(ray.cluster_resources()["CPU"])
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            remove_placement_group(blocker)

    yield release
    release()


def _node(cpus: float, gpus: float = 0.0, alive: bool = True, address: str = "10.0.0.1",
          node_id: str | None = None) -> dict[str, Any]:
    """A node as ray.nodes() lists it."""
    resources = {"CPU": cpus, "memory": 8e9, f"node:{address}": 1.0}
    if gpus:
        resources["GPU"] = gpus
    return {"NodeID": node_id or address, "Alive": alive, "NodeManagerAddress": address, "Resources": resources}


def _small_run(config: RunConfig | None = None) -> RunConfig:
    """A run whose actors the local Ray's 2 CPUs hold (RUN_REQUESTS)."""
    config = config or RunConfig()
    config.service.num_rollout_workers = 1
    config.service.worker_cpus = 0.5
    config.service.num_reward_replicas = 1
    return config


def test_a_request_no_node_can_hold_is_refused_naming_the_field_and_the_largest_node() -> None:
    config = RunConfig()
    config.service.num_rollout_workers = 1
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


def test_the_actors_must_fit_the_nodes_together() -> None:
    """The verified 2 + 1 CPU cluster: the learner (1 CPU) on the 1-CPU node, a 1.5-CPU worker and the reward replica
    (0.25) on the 2-CPU one fit together; a second 1.5-CPU worker fits no node beside the first."""
    nodes = [_node(2.0), _node(1.0, address="10.0.0.2"), _node(16.0, alive=False, address="10.0.0.3")]
    config = RunConfig()
    config.service.num_rollout_workers = 1
    config.service.worker_cpus = 1.5
    check_placement(config, nodes)
    config.service.num_rollout_workers = 2
    with pytest.raises(ValueError) as info:
        check_placement(config, nodes)
    assert str(info.value) == (
        "the Ray cluster's nodes cannot hold this run's actors together: learner ranks: service.num_learners=1 of 1 "
        "CPU each (train.device='cpu'), rollout workers: service.num_rollout_workers=2 of service.worker_cpus=1.5 "
        "CPUs each, reward replicas: service.num_reward_replicas=1 of 0.25 CPUs each; each actor's resources go on "
        "one node, and no assignment of them fits the nodes' totals (10.0.0.1 2 CPUs; 10.0.0.2 1 CPU): first-fit "
        "decreasing found none, and neither did a search of every assignment. Ray places them all or nothing, so "
        "the run would wait for room without end: lower service.worker_cpus or service.num_rollout_workers, or add "
        "a node")
    # The cluster's totals suffice (3.45 of 3.5 CPUs), and each actor fits a node alone, but not all together: the
    # 1.5-CPU node holds one 1.1-CPU worker or the learner, the 2-CPU node not both of the others.
    config.service.worker_cpus = 1.1
    with pytest.raises(ValueError, match=r"cannot hold this run's actors together: .*service.worker_cpus=1.1 CPUs "
                                         r"each, .*\(10.0.0.1 2 CPUs; 10.0.0.2 1.5 CPUs\)"):
        check_placement(config, [_node(2.0), _node(1.5, address="10.0.0.2")])
    # Two nodes started on one machine share its address: the message tells them apart by node id.
    same_host = [_node(2.0, address="127.0.0.1", node_id="aaaaaaaa1111"),
                 _node(1.5, address="127.0.0.1", node_id="bbbbbbbb2222")]
    with pytest.raises(ValueError, match=r"totals \(127.0.0.1 \(node aaaaaaaa\) 2 CPUs; 127.0.0.1 \(node bbbbbbbb\) "
                                         r"1.5 CPUs\)"):
        check_placement(config, same_host)


def test_first_fit_decreasing_is_a_heuristic_a_search_decides(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def cpus(*amounts: float) -> list[dict[str, float]]:
        return [{"CPU": amount} for amount in amounts]

    # The textbook case: first-fit decreasing fills one node with 5 + 4 and strands a 2; {5, 3, 2} {4, 4, 2} fit.
    assert not first_fit_decreasing(cpus(5, 4, 4, 3, 2, 2), cpus(10, 10))
    assert fit_together(cpus(5, 4, 4, 3, 2, 2), cpus(10, 10)) is True
    assert fit_together(cpus(5, 4, 4, 3, 2, 2.5), cpus(10, 10)) is False
    assert fit_together(cpus(5, 4, 4, 3, 2, 2), cpus(10, 10), steps=0) is None  # gave up undecided
    gpus = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.5}]
    assert fit_together(gpus, [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.5, "GPU": 1.0}]) is True
    assert fit_together(gpus, [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]) is False  # 1 CPU beside a rank
    assert fit_together(gpus, [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 8.0}]) is False  # one GPU for two ranks
    # A run of the same shape: learner 1 and reward 0.25 on the 1.25-CPU node, both 0.75-CPU workers on the other.
    config = RunConfig()
    config.service.num_rollout_workers = 2
    config.service.worker_cpus = 0.75
    nodes = [_node(1.5), _node(1.25, address="10.0.0.2")]
    assert not first_fit_decreasing([request.resources for request in actor_requests(config)],
                                    [node["Resources"] for node in nodes])
    check_placement(config, nodes)
    monkeypatch.setattr(ray_runtime, "PACKING_SEARCH_STEPS", 0)
    with caplog.at_level(logging.WARNING, logger="services.ray_runtime"):
        check_placement(config, nodes)  # unsure: a warning, not a refusal
    assert [record.getMessage() for record in caplog.records] == [
        "first-fit decreasing found no way to fit this run's actors together on the Ray cluster's nodes (learner "
        "ranks: service.num_learners=1 of 1 CPU each (train.device='cpu'), rollout workers: "
        "service.num_rollout_workers=2 of service.worker_cpus=0.75 CPUs each, reward replicas: "
        "service.num_reward_replicas=1 of 0.25 CPUs each; nodes' totals: 10.0.0.1 1.5 CPUs; 10.0.0.2 1.25 CPUs), "
        "and a search of every assignment gave up undecided after 0 tries: Ray may still place them; if it cannot, "
        "the run says so and waits for room"]


def test_the_requests_are_one_bundle_per_actor_learner_ranks_first() -> None:
    config = RunConfig()
    config.service.num_learners = 2
    config.service.num_rollout_workers = 3
    config.service.worker_cpus = 1.5
    config.service.num_reward_replicas = 2
    assert [(request.name, request.resources) for request in actor_requests(config)] == [
        ("learner", {"CPU": 1.0}), ("learner rank 1", {"CPU": 1.0}), ("rollout_worker-0", {"CPU": 1.5}),
        ("rollout_worker-1", {"CPU": 1.5}), ("rollout_worker-2", {"CPU": 1.5}), ("reward-0", {"CPU": 0.25}),
        ("reward-1", {"CPU": 0.25})]
    config.service.mode = "colocated"
    config.service.num_learners = 1
    assert [(request.name, request.resources) for request in actor_requests(config)] == [("learner", {"CPU": 1.0})]


def test_the_check_reads_the_nodes_ray_gives(local_ray: None) -> None:
    config = _small_run()
    check_placement(config, ray.nodes())
    largest = max(node["Resources"]["CPU"] for node in ray.nodes() if node["Alive"])
    config.service.worker_cpus = largest + 1
    with pytest.raises(ValueError, match=rf"service.worker_cpus={largest + 1} asks for that many CPUs; .* the largest "
                                         rf"has {largest:g} CPUs"):
        check_placement(config, ray.nodes())
    config.service.worker_cpus = largest - 0.5  # fits alone, not beside the learner
    with pytest.raises(ValueError, match=r"cannot hold this run's actors together"):
        check_placement(config, ray.nodes())


def test_free_per_node_takes_the_placed_bundles_off_each_node() -> None:
    nodes = [_node(2.0), _node(1.0, address="10.0.0.2")]
    groups = {
        "a": {"state": "CREATED", "bundles": {0: {"CPU": 1.0}, 1: {"CPU": 0.25}},
              "bundles_to_node_id": {0: "10.0.0.1", 1: "10.0.0.1"}},
        "b": {"state": "PENDING", "bundles": {0: {"CPU": 1.5}}, "bundles_to_node_id": {0: ""}},
    }
    free = free_per_node(nodes, groups, available={"CPU": 1.75})
    assert [(label, room["CPU"]) for label, room, _ in free] == [("10.0.0.1", 0.75), ("10.0.0.2", 1.0)]
    # Two nodes started on one machine share its address: a short node id tells them apart.
    same_host = [_node(2.0, address="127.0.0.1", node_id="10.0.0.1"),
                 _node(1.0, address="127.0.0.1", node_id="3a932c4918644aaf")]
    free = free_per_node(same_host, groups, available={"CPU": 1.75})
    assert [(label, room["CPU"]) for label, room, _ in free] == [("127.0.0.1 (node 10.0.0.1)", 0.75),
                                                                 ("127.0.0.1 (node 3a932c49)", 1.0)]


def test_the_run_reserves_every_actor_at_once_in_one_group(local_ray: None) -> None:
    reservation = Reservation(actor_requests(_small_run()))
    try:
        assert reservation.group.wait(30) and reservation.placed()
        table = placement_group_table(reservation.group)
        assert table["strategy"] == "PACK" and table["state"] == "CREATED"
        assert list(table["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.25}]
        assert all(table["bundles_to_node_id"][index] for index in table["bundles"])  # every bundle on a node
        assert [reservation.placement(name).index for name in ("learner", "rollout_worker-0", "reward-0")] == [0, 1, 2]
        with pytest.raises(KeyError, match="rollout_worker-1"):
            reservation.placement("rollout_worker-1")
    finally:
        reservation.release()


def test_a_run_waiting_for_room_is_said_so_once_with_every_request_and_what_nodes_have(
    full_cluster: Callable[[], None],
) -> None:
    reservation = Reservation(actor_requests(_small_run()))
    try:
        assert not reservation.placed()
        assert reservation.waiting_note(grace_s=0.5) is None  # within the grace: placing may take a moment
        time.sleep(0.6)
        note = reservation.waiting_note(grace_s=0.5)
        assert note is not None
        address = ray.nodes()[0]["NodeManagerAddress"]
        total = ray.cluster_resources()["CPU"]
        assert note == (f"{WAITING} (1s so far): Ray reserves them in one placement group, all or nothing, each "
                        f"actor's resources on one node: {RUN_REQUESTS}; free now: {address} 0 of {total:g} CPUs. "
                        f"The run starts once they fit (a node joins or frees up)")
        assert reservation.waiting_note(grace_s=0.5) is None  # one line, not one per check
        full_cluster()  # room on the node: Ray places every bundle at once
        assert reservation.group.wait(10) and reservation.placed()
        assert all(reservation.placement(name).placed() for name in ("learner", "rollout_worker-0", "reward-0"))
    finally:
        reservation.release()


@pytest.fixture
def orchestrator(redis_url: str, tmp_path: Path, local_ray: None) -> Iterator[Orchestrator]:
    """A run's orchestrator, without its learner: its supervision and start waits are driven by the test, which
    reserves the run's actors (`_reserve`) when the cluster is as it needs."""
    config = _small_run()
    config.train.out_dir = str(tmp_path / "run")
    config.service.metrics_discovery_dir = str(tmp_path / "discovery")
    config.service.heartbeat_timeout_s = 3.0
    config.service.namespace = f"test-placement-{time.monotonic_ns()}"
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, config.service.namespace, resume=False,
                                progress=False)
    orchestrator.placement_grace_s = 0.5
    orchestrator.broker.ensure_group(DOCUMENTS, ROLLOUT_GROUP, start_id="0")
    orchestrator.broker.ensure_group(LEARNER_REPORTS, ORCHESTRATOR_GROUP, start_id="0")
    orchestrator.events_path = tmp_path / "events.jsonl"
    orchestrator.events_path.write_text("")
    yield orchestrator
    orchestrator._shutdown()  # kills the actors and gives the run's placement group back


def _silent_actor(max_concurrency: int = 1) -> Callable[[str, Placement], Any]:
    """A member that never beats (its class is defined here: Ray's workers cannot import this test module); it
    answers while it runs only with a `max_concurrency` over 1."""
    class Silent:
        def run(self) -> str:
            time.sleep(120)
            return ""

        def answer(self) -> str:
            return json.dumps({"answer": 42})

    silent = ray.remote(Silent)
    return lambda member_id, placement: silent.options(num_cpus=0.5, max_concurrency=max_concurrency,
                                                       scheduling_strategy=placement.strategy()).remote()


def _silent_worker(orchestrator: Orchestrator, max_concurrency: int = 1) -> Member:
    """Rollout worker 0 of the run, in its bundle, started."""
    member = Member("rollout_worker", 0, DOCUMENTS, ROLLOUT_GROUP, _silent_actor(max_concurrency),
                    orchestrator._reserve().placement("rollout_worker-0"))
    orchestrator.members.append(member)
    member.start()
    return member


def _supervise_until(orchestrator: Orchestrator, done: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        orchestrator._supervise()
        time.sleep(0.1)


def test_a_member_waiting_for_room_is_not_restarted_and_its_start_timeout_counts_from_its_placement(
    orchestrator: Orchestrator, full_cluster: Callable[[], None], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(orchestrator_module, "ACTOR_START_TIMEOUT_S", 1.0)  # with heartbeat_timeout_s: 3s to beat
    member = _silent_worker(orchestrator)
    # Unplaced past the heartbeat grace: said once, never restarted (a replacement would wait the same).
    _supervise_until(orchestrator, lambda: False, seconds=3.5)
    assert member.incarnation == 0 and not orchestrator.restarts
    notes = [record.message for record in caplog.records if WAITING in record.message]
    assert len(notes) == 1 and notes[0].startswith(f"{WAITING} (")
    assert f"each actor's resources on one node: {RUN_REQUESTS}; free now: " in notes[0]
    # Placed, it is supervised as before: it never beats, so it is restarted, 3s after its placement.
    full_cluster()
    _supervise_until(orchestrator, member.placement.placed, seconds=10)
    placed = time.monotonic()
    _supervise_until(orchestrator, lambda: member.incarnation > 0, seconds=10)
    assert member.incarnation == 1 and time.monotonic() - placed >= 3.0
    assert any("rollout_worker-0.0 restarted as rollout_worker-0.1: it never sent a heartbeat in 3s" in record.message
               for record in caplog.records)


def test_a_restarted_member_takes_its_predecessors_bundle(orchestrator: Orchestrator) -> None:
    reservation = orchestrator._reserve()
    assert reservation.group.wait(30)
    # The rest of the node goes to another job: the replacement can only run in the bundle its predecessor had.
    rest = _block(ray.cluster_resources()["CPU"] - 1.75)
    try:
        member = _silent_worker(orchestrator, max_concurrency=2)  # answers while it runs
        placement = member.placement
        assert json.loads(ray.get(member.actor.answer.remote(), timeout=30)) == {"answer": 42}
        bundle = f"CPU_group_{placement.index}_{reservation.group.id.hex()}"
        assert ray.available_resources().get(bundle, 0.0) == 0.0  # its 0.5 CPUs, all in use
        orchestrator._restart(member, "a test restart")
        assert member.incarnation == 1 and member.placement is placement and placement.name == "rollout_worker-0.1"
        assert json.loads(ray.get(member.actor.answer.remote(), timeout=30)) == {"answer": 42}
        assert ray.available_resources().get(bundle, 0.0) == 0.0
        assert placement_group_table(reservation.group)["state"] == "CREATED"
    finally:
        remove_placement_group(rest)


def test_the_run_end_does_not_wait_for_members_never_placed(
    orchestrator: Orchestrator, full_cluster: Callable[[], None], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member whose bundle Ray never placed never returns: the run's end must not wait STOP_GRACE_S for it."""
    monkeypatch.setattr(orchestrator_module, "STOP_GRACE_S", 20.0)
    member = _silent_worker(orchestrator)
    orchestrator.learner_future = ray.put(json.dumps({"step": 3}))  # the learner returned
    started = time.monotonic()
    assert orchestrator._finish() == {"step": 3}
    assert time.monotonic() - started < 5 and not member.placement.placed()


def test_the_learner_start_waits_for_room_without_counting_it(
    orchestrator: Orchestrator, full_cluster: Callable[[], None], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Room enough for a loaded machine to start the actor's process once it is placed (2.5 s was too little).
    monkeypatch.setattr(orchestrator_module, "ACTOR_START_TIMEOUT_S", 6.0)
    placement = orchestrator._place_learner()
    learner = _silent_actor()("learner", placement)
    threading.Timer(7.0, full_cluster).start()  # unplaced for longer than the start timeout
    assert json.loads(orchestrator._await_start(learner.answer.remote(), [placement])) == {"answer": 42}
    notes = [record.message for record in caplog.records if WAITING in record.message]
    assert len(notes) == 1 and RUN_REQUESTS in notes[0]


def test_a_placed_learner_that_does_not_answer_times_out_from_its_placement(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(orchestrator_module, "ACTOR_START_TIMEOUT_S", 1.0)
    placement = orchestrator._place_learner()
    learner = _silent_actor()("learner", placement)
    learner.run.remote()  # busy: the answer never comes
    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"the learner did not start within 1s of its placement"):
        orchestrator._await_start(learner.answer.remote(), [placement])
    assert time.monotonic() - started < 5


def test_members_with_other_sources_than_the_drivers_fail_the_start_once_and_are_not_restarted(
    orchestrator: Orchestrator,
) -> None:
    """A rollout worker or reward replica whose sources are not the driver's refuses to start: a start that failed,
    told once; a replacement would import the same sources."""
    orchestrator.sources = OTHER_SOURCES
    orchestrator._start_members()
    with pytest.raises(ServiceError, match=rf"^(rollout_worker|reward)-0\.0 failed to start: {REFUSED}"):
        _supervise_until(orchestrator, lambda: False, seconds=120)
    assert not orchestrator.restarts and [member.incarnation for member in orchestrator.members] == [0, 0]


def test_a_learner_rank_that_fails_to_start_ends_the_learners_start_with_its_error(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank 0 waits for its group's other ranks (300 s or more): a rank that failed to start (here: its sources are
    not the driver's) ends the wait at once, with its own error."""
    monkeypatch.setattr(orchestrator_module, "ACTOR_START_TIMEOUT_S", 60.0)
    placement = orchestrator._place_learner()
    learner = _silent_actor()("learner", placement)
    learner.run.remote()  # busy, as rank 0 waiting for its group: its answer never comes
    replica = ray.remote(LearnerReplica).options(num_cpus=0).remote(
        orchestrator.config_json, 1, "127.0.0.1:1", False, sources=OTHER_SOURCES)
    orchestrator.replicas, orchestrator.replica_futures = [replica], [replica.run.remote()]
    with pytest.raises(ServiceError, match=rf"^the learner failed to start: learner rank 1 failed: {REFUSED}"):
        orchestrator._await_start(learner.answer.remote(), [placement])
