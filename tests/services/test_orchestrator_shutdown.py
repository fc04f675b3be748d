"""What a service run's shutdown (services.orchestrator `_shutdown`) leaves behind, on a real Redis and without Ray."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from learner.checkpoint import LearnerState
from learner.learner import MEMBER_ID, ROLE
from refine.config import load_config
from services.metrics import Metrics, serve_metrics
from refine.runtime import sigterm_as_ctrl_c
from services.messages import DocumentBatch
from services.orchestrator import SIGNALLED_STOP_GRACE_S, STOP_GRACE_S, Orchestrator
from services.resilience import RedisStateLost
from services.role import RoleRuntime
from services.streams import DOCUMENTS, ROLLOUT_GROUP


class RayAborted(BaseException):
    """What Ray's core does to a driver whose cluster is gone: it ends the process, no Python handler runs."""


def test_prometheus_targets_are_withdrawn_before_any_call_to_ray(tmp_path, redis_url, namespace, monkeypatch):
    """A SIGTERM to the whole process group (timeout, systemd, Slurm) ends a local Ray with the driver, and the
    shutdown's first Ray call then aborts the process: a target still announced stayed down for good, and
    RefineRoleDown fired for it."""
    discovery = tmp_path / "prometheus"
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                       f"service.metrics_discovery_dir={discovery}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
    orchestrator.endpoint = serve_metrics(orchestrator.metrics, role="orchestrator", instance=namespace,
                                          discovery_dir=discovery, bind="127.0.0.1", run=namespace)
    learner = serve_metrics(Metrics(), role=ROLE, instance=MEMBER_ID, discovery_dir=discovery, bind="127.0.0.1",
                            run=namespace)  # a learner Ray could no longer kill, as the learner announces itself
    orchestrator.learner = object()  # an actor handle: the shutdown kills it through Ray

    def aborts(*args, **kwargs):
        raise RayAborted

    monkeypatch.setattr(ray, "kill", aborts)
    try:
        assert len(list(discovery.glob("*.json"))) == 2
        with pytest.raises(RayAborted):
            orchestrator._shutdown()
        assert list(discovery.glob("*.json")) == []
    finally:
        learner.close()
        orchestrator.client.close()


class Reservation:
    """A placement group whose removal aborts the process, as Ray's core does once a local Ray's GCS is gone."""

    def __init__(self) -> None:
        self.released = False

    def release(self) -> None:
        self.released = True
        raise RayAborted


@pytest.mark.parametrize("ray_is_the_runs", [True, False], ids=["local_ray", "cluster"])
def test_the_runs_keys_are_deleted_before_the_placement_group_is_released(tmp_path, redis_url, namespace,
                                                                         redis_client, monkeypatch, ray_is_the_runs):
    """Removing the group waited 60 s for a dead GCS and ended the process before the namespace was deleted: the
    run's keys (two weight copies among them) stayed in Redis. A local Ray of the run's own is not asked at all:
    its shutdown takes the group."""
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                       f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False,
                                ray_is_the_runs=ray_is_the_runs)
    orchestrator._claim_namespace()  # as a run holds it
    orchestrator.reservation = reservation = Reservation()
    monkeypatch.setattr(ray, "kill", lambda *args, **kwargs: None)
    redis_client.set(f"{namespace}:weights:blob:1", b"x" * 1000)
    try:
        if ray_is_the_runs:
            orchestrator._shutdown()
        else:
            with pytest.raises(RayAborted):
                orchestrator._shutdown()
        assert list(redis_client.scan_iter(match=f"{namespace}:*")) == []
        assert reservation.released is not ray_is_the_runs
    finally:
        orchestrator.client.close()


def test_a_role_still_reading_when_the_run_is_killed_leaves_no_stream_behind(tmp_path, redis_url, namespace,
                                                                            redis_client, monkeypatch,
                                                                            wait_for_blocked_read):
    """A second Ctrl-C kills the actors, then deletes the run's keys; Ray carries a kill out asynchronously, and a
    rollout worker still blocked in its read made its consumer group again, the stream with it: the key stayed in
    Redis after the run. Its loop ends on the run's lost state instead, and no key of the run is left."""
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                       f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
    orchestrator._claim_namespace()
    orchestrator._fresh_streams()
    monkeypatch.setattr(ray, "kill", lambda *args, **kwargs: None)  # a kill Ray has not carried out yet
    # The role's reads are under test: its heartbeat thread does not beat meanwhile.
    worker = RoleRuntime("rollout_worker", "rollout_worker-0.0", redis_url, namespace, None, heartbeat_interval_s=3600)
    deleted = threading.Event()
    outcome: list = []

    def worker_loop() -> None:
        reads_after = 0
        try:
            while reads_after < 2:  # two reads that started after the run's end: enough to make the stream again
                started_after = deleted.is_set()
                worker.broker.consume(DOCUMENTS, ROLLOUT_GROUP, worker.member_id, DocumentBatch, block_ms=200)
                reads_after += started_after
        except RedisStateLost as exc:
            outcome.append(exc)

    loop = threading.Thread(target=worker_loop)
    loop.start()
    try:
        wait_for_blocked_read(redis_client)
        orchestrator._shutdown()
        deleted.set()
        loop.join(timeout=30)
        assert not loop.is_alive()
    finally:
        worker.close()
        orchestrator.client.close()
    assert [type(error).__name__ for error in outcome] == ["StreamGone"], "the worker read on from a stream it made"
    assert list(redis_client.scan_iter(match=f"{namespace}:*")) == []


def test_a_ctrl_c_as_the_run_ends_still_kills_its_actors_and_deletes_its_keys(tmp_path, redis_url, namespace,
                                                                              redis_client, monkeypatch):
    """A second Ctrl-C that landed as a graceful stop ended, while the run killed its actors, cut the run's end short:
    every key of the run stayed in Redis (its claim, its stop flag, its streams)."""
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                       f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
    orchestrator._claim_namespace()
    orchestrator._fresh_streams()
    orchestrator.learner = object()  # an actor handle: the shutdown kills it through Ray
    pressed: list[object] = []

    def ctrl_c_as_it_kills(actor, **kwargs) -> None:
        pressed.append(actor)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ray, "kill", ctrl_c_as_it_kills)
    handler = signal.getsignal(signal.SIGINT)
    try:
        orchestrator._shutdown()
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C cut the run's end short")
    finally:
        orchestrator.client.close()
    assert pressed == [orchestrator.learner]
    assert list(redis_client.scan_iter(match=f"{namespace}:*")) == []
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again afterwards


def test_a_learner_lost_with_ray_during_a_stop_is_an_interruption_not_a_failure(tmp_path, redis_url, namespace,
                                                                                monkeypatch, caplog):
    """A SIGTERM to the whole process group can take the local Ray's learner before its checkpoint: the run said
    "the learner failed" and exited 2, though it stopped as asked."""
    from refine.loop import RunInterrupted

    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                       f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)

    def lost(*args, **kwargs):
        raise ray.exceptions.ActorUnavailableError("Socket closed", None)

    monkeypatch.setattr(ray, "get", lost)
    try:
        orchestrator.stopping = True
        with pytest.raises(RunInterrupted):
            orchestrator._finish()
        orchestrator.stopping = False
        with pytest.raises(Exception, match="the learner failed"):
            orchestrator._finish()
    finally:
        orchestrator.client.close()
    assert "interrupted at step 0 of train.steps=" in caplog.text


def test_a_run_killed_at_once_names_its_checkpoints_step_and_the_command_that_resumes_it(tmp_path, redis_url,
                                                                                           namespace):
    """A second Ctrl-C kills the run at once: it said nothing after "refine: interrupted", neither where the run
    stands nor how to resume it."""
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}", "train.steps=40",
                                                       f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    command = ["refine", "train", str(tmp_path / "run" / "config.yaml"), "--redis-url", "redis://h:1/0", "--resume"]
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False,
                                resume_command=command)
    orchestrator.client.close()
    resume = f"resume with `refine train {tmp_path / 'run' / 'config.yaml'} --redis-url redis://h:1/0 --resume`"
    assert orchestrator._killed_message() == (
        f"killed at once, before its first checkpoint (a resume starts at step 0); {resume}")
    state_file = tmp_path / "run" / "checkpoints" / "latest" / "learner_state.json"
    state_file.parent.mkdir(parents=True)
    state_file.write_text(LearnerState(step=12, cursor=24, weight_version=12).model_dump_json())
    assert orchestrator._killed_message() == (
        f"killed at once: its last checkpoint holds step 12 of train.steps=40; {resume}")
    state_file.write_text("{")
    assert orchestrator._killed_message().startswith(f"killed at once (its last checkpoint: {state_file}: not a "
                                                     f"readable learner state")


def test_the_restart_limit_names_the_command_that_resumes_the_run(tmp_path, redis_url, namespace):
    """Every other fatal error of a service run with a checkpoint ends with the resume command; the restart
    limit's said only what failed."""
    import time
    from types import SimpleNamespace

    from services.failures import ServiceError
    from services.restart_limit import MAX_RESTARTS_PER_ROLE, RestartWindow

    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                       f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False)
    (tmp_path / "run" / "checkpoints" / "latest").mkdir(parents=True)
    window = orchestrator.restarts["rollout_worker"] = RestartWindow()
    for _ in range(MAX_RESTARTS_PER_ROLE):
        window.add(time.monotonic())
    try:
        with pytest.raises(ServiceError, match=rf"rollout_worker restarted {MAX_RESTARTS_PER_ROLE} times already "
                                               rf"within 60 minutes; resume from its last checkpoint with `refine "
                                               rf"train {tmp_path / 'run' / 'config.yaml'} --resume`$"):
            orchestrator._restart(SimpleNamespace(role="rollout_worker", member_id="rollout_worker-0.20"), "died")
    finally:
        orchestrator.client.close()


@pytest.mark.parametrize("ray_is_the_runs", [True, False], ids=["local_ray", "cluster"])
def test_after_a_sigterm_a_local_rays_actors_are_waited_for_briefly(tmp_path, redis_url, namespace, ray_is_the_runs):
    """A SIGTERM to the whole process group reaches a local Ray's processes too, and the driver's Ray client ends the
    process 60 s after losing them: waiting STOP_GRACE_S (60 s) for the rollout workers to return ended a stopped
    run with exit 1. A cluster that outlives the run, or a Ctrl-C (which Ray's processes block), keeps the grace."""
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                       f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False,
                                ray_is_the_runs=ray_is_the_runs)
    try:
        with sigterm_as_ctrl_c():
            assert orchestrator._stop_grace_s() == STOP_GRACE_S
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            expected = SIGNALLED_STOP_GRACE_S if ray_is_the_runs else STOP_GRACE_S
            assert orchestrator._stop_grace_s() == expected
            assert (expected < 60) == ray_is_the_runs
    finally:
        orchestrator.client.close()


@pytest.mark.parametrize("job_stage", [False, True], ids=["own_run", "main_job_stage"])
def test_a_stop_during_the_last_step_ends_a_main_job_stage_as_interrupted(tmp_path, redis_url, namespace, job_stage):
    """A stop asked during a service run's last step finished that run as done (its work is), and the main job then
    trained its next stage: a stage of the main job stops as interrupted, as its local stages do (refine.loop)."""
    config = load_config("configs/service_tiny.yaml", [f"train.out_dir={tmp_path / 'run'}", "train.steps=5",
                                                       f"service.metrics_discovery_dir={tmp_path / 'prometheus'}"])
    orchestrator = Orchestrator(config, None, redis_url, namespace, resume=False, progress=False, job_stage=job_stage)
    try:
        assert not orchestrator._stopped_early(3)  # no stop asked
        orchestrator.stopping = True
        assert orchestrator._stopped_early(4)
        assert orchestrator._stopped_early(5) == job_stage
    finally:
        orchestrator.client.close()
