"""The job's driver: `refine train` on Ray with Redis streams.

`run(config)` sets up Ray and Redis (services/ray_runtime.py), owns the run directory
(config.yaml, metrics.jsonl, PNG curves; the learner writes checkpoints/ into it), starts the roles
as Ray actors, feeds them documents, supervises them and returns the learner's last stats.

Roles (disaggregated): N rollout workers (documents -> rollouts), M reward replicas
(rollouts -> scored), one learner (scored -> optimizer steps, weights, checkpoints). Colocated: the
learner alone runs the fused on-policy step on the documents. (Here `service.mode` decides: one-pass update or
fused step. A `train.mode` given for the other is refused before anything starts, and config.yaml records the one
trained: services/run_checks.py.)

Pacing. The learner's policy version is its step count, and it publishes weights every
`sync_interval` steps. A document batch published while version `v` is out is rolled out with weights of
version >= v (workers pull the newest weights right before each batch). With several workers batches
finish in any order, so each unfinished batch may be trained after all the others: with the learner at
`step` steps and `u` batches unfinished besides a new one, any of them is trained after at most
`step + u` steps, with staleness at most `step + u - v` for its own `v`. The orchestrator therefore
publishes only while `u <= max_staleness - (step - v_oldest)`, `v_oldest` the version out when the oldest
unfinished batch was published, and never more than `batches_in_flight` unfinished batches: no batch is
ever too stale to train.
`u` counts every batch from the first one not finished yet, in publish order (LearnerProgress.unbroken):
a batch that hangs holds publishing back, so at most `batches_in_flight` batches finish past it, and the
checkpoint's data cursor, which stands before it, stays that close (a resume trains those again).
With max_staleness = 0 (and sync_interval = 1) that means: one batch at a time, published only
after the weights of the current step are out: strictly on-policy, one rollout batch per learner step
(`train.mini_batches` > 1 then splits that step into optimizer steps on the same rollouts, as the paper's
code does). More staleness lets rollouts of the next batches overlap the learner's step. (A batch rolled out again
after its worker was replaced gets the newest weights, within the bound too; one found too stale anyway
is dropped and counted by the learner.)

Supervision. Every role beats in Redis. A rollout worker or reward replica whose actor died, or
whose heartbeat is older than `heartbeat_timeout_s`, is killed and replaced by a fresh consumer;
the entries it held are made reclaimable at once and the survivors take them over with XAUTOCLAIM.
Entries nobody released are taken over once idle for twice the heartbeat timeout
(`ServiceConfig.reclaim_idle_ms`), so that fallback never races the orchestrator for a hung role's batch.
A failed learner ends the run with its error; `refine train --resume` continues from its last
checkpoint. An actor that failed as it started (before its first heartbeat) ends the run too, told once: a
replacement would fail the same way, as one whose sources are not the driver's does (services/source_digest.py).
Restarts count against MAX_RESTARTS_PER_ROLE within RESTART_WINDOW_S. Every actor's resources are
reserved at once, before any actor is created, in one placement group that Ray places all or nothing
(services/ray_runtime.py `Reservation`): a run whose actors do not fit the nodes together right now is no failure:
it is said so once, after PLACEMENT_GRACE_S, with what each actor asks for and what each node has free, and waited
for; a replacement takes its predecessor's bundle, and start timeouts count from the placement. A Redis outage is
ridden out for as long as the learner does (services/resilience.py `outage_timeout_s`); past that the
run ends with an error naming the Redis URL.

Stopping. Ctrl-C (or SIGTERM, which `ray job stop` sends) sets the run's stop flag in Redis: the
learner checkpoints and returns, the other roles leave their loops, and the run ends as usual. A
second Ctrl-C kills the actors at once, then says which step the learner's last checkpoint holds and the resume
command. A role Ray has not killed yet when the run's keys are deleted makes none again (services.broker): its
loop ends on the run's lost state. A run that fails (a bad data row, a dead letter, a role restarted too often)
sets the stop flag too and gives the learner up to STOP_GRACE_S to checkpoint before the actors are killed; the
error then ends the run.

Resume. A run always starts from an empty namespace; everything durable is in the learner's
checkpoint (weights, optimizer, RNG, data cursor, weight version). So every key of the namespace may expire:
each is written with an expiry of `service.key_ttl_s`, which the driver refreshes while the run goes on, and a
driver killed without cleaning up (SIGKILL, a forced `ray job stop`, a node lost) leaves nothing in a shared Redis
for good.
Rollouts are seeded per batch from the data cursor, so with max_staleness = 0 (or colocated) a resumed run
repeats, step for step, what the uninterrupted run would have done. metrics.jsonl and events.jsonl keep what happened
up to the checkpoint, plus the learner's reports the checkpoint kept because this driver had not
confirmed writing them (services/progress.py). config.yaml is written once the learner accepted the
checkpoint: a refused resume leaves the run's config as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import redis
import torch
from tqdm import tqdm

from learner.checkpoint import latest_checkpoint, read_learner_state
from refine.checkpoints import (
    check_inputs_outside_checkpoints, check_kept_without_latest, check_resumed_dtype, check_resumed_program,
    check_resumed_tokenizer, clear_checkpoints, fresh_run_message, resume_command_named,
)
from refine.config import (
    BUILT_IN_DISCOVERY_DIR, DTYPES, RunConfig, dump_config, fit_to_tokenizer, input_path_fields, run_tokenizer,
)
from refine.data.batches import DocumentBatch as LocalBatch
from refine.data.stream import DataPosition, check_resumed_cursor, check_source, document_batches, shuffled_pass_span
from refine.files import write_atomically
from refine.loop import RunInterrupted, interrupted_message, killed_message, rate_change_warning, warmup_warning
from refine.optim import describe_rates
from refine.run_files import (
    absolute_out_dir, check_data_apart_from_run, finished_run, plot_run, restart_metrics, write_row,
)
from refine.run_lock import run_directory_lock
from refine.runtime import ctrl_c_ignored, note, progress_bar, sigterm_as_ctrl_c, sigterm_received
from refine.step import Divergence
from refine.tokenizer import Tokenizer
from services.broker import Broker
from services.failures import ServiceError, actor_error, describe_failure
from services.key_expiry import KeyExpiryKeeper
from services.member_files import remove_member_files, remove_staged_checkpoints
from services.messages import DataCursor, DocumentBatch
from services.metrics import (ROLE_FAMILIES, Metrics, serve_metrics, withdraw_announcements,
                             withdraw_run_announcements)
from services.namespace_claim import (
    CLAIMS_HELD_HERE, check_namespace_free, claim_ttl_s, current_pid_namespace, describe_holder, driver_is_gone,
    key_ttl_s, namespace_for, namespace_in_use,
)
from services.progress import (
    LearnerProgress, StepReport, read_progress, read_published, write_published, write_recorded,
)
from services.ray_runtime import (
    Placement, Reservation, actor_options, actor_requests, check_no_hidden_packages, ray_for_run, redis_for_run,
    resolve_addresses,
)
from services.redis_server import connect, eviction_warning, redact_url
from services.report_files import event_row, logged, restart_events, restore_reports
from services.resilience import (
    TRANSIENT, OutageTolerance, RedisOutage, RedisStateLost, outage_timeout_s, retry_redis,
)
from services.restart_limit import MAX_RESTARTS_PER_ROLE, RESTART_WINDOW_S, RestartWindow
from services.run_checks import check_data_source, check_service_config, with_service_train_mode
from services.source_digest import own_stamp
from services.streams import (
    DOCUMENTS, LEARNER_REPORTS, ORCHESTRATOR_GROUP, REWARD_GROUP, ROLLOUT_GROUP, ROLLOUTS, SCORED, DocumentStore,
    check_rollout_message_size, delete_idle_consumers, document_batch_id_for, make_run_streams, release_consumer,
    run_groups, trim_acknowledged,
)

__all__ = ["data_cursor", "run"]

logger = logging.getLogger(__name__)

Stats = dict[str, float | int | str]

ACTOR_START_TIMEOUT_S = 300.0  # from the actor's placement: waiting for room on a node is not starting
# A run whose actors Ray has not placed after this long is said to wait (placing takes milliseconds when they fit).
PLACEMENT_GRACE_S = 30.0
START_POLL_S = 1.0
HOUSEKEEPING_INTERVAL_S = 2.0
# A run whose learner takes no step for this long is said to stall, once per such interval, with what each stream
# holds and which consumer holds it: a role whose loop hangs keeps beating, and nothing else would say which it is.
STALL_WARNING_S = 600.0
STOP_GRACE_S = 60.0
# The same, after a SIGTERM with a local Ray: a signal to the whole process group reaches Ray's processes too (its
# agents end, and its raylet with them), and the driver's Ray client ends the process 60 s after losing them.
SIGNALLED_STOP_GRACE_S = 5.0
# Reports delivered to the orchestrator this long ago and never acknowledged (their reply lost in a Redis outage)
# are read again by the housekeeping.
REPORT_RECLAIM_IDLE_MS = 5000
REDIS_RETRY_PAUSE_S = 0.5


def _finished_run(config: RunConfig) -> Stats | None:
    """For a resume: the last step's stats when the checkpoint already reached train.steps (nothing to
    train, so nothing is started), else None. The reports the checkpoint kept are written first."""
    out_dir = Path(config.train.out_dir)
    checkpoint = latest_checkpoint(out_dir)
    if not checkpoint.exists():
        return None
    state = read_learner_state(checkpoint)
    if state.step < config.train.steps:
        return None
    restart_metrics(out_dir / "metrics.jsonl", state.step)
    restart_events(out_dir / "events.jsonl", state.step, state.reports)
    restore_reports(checkpoint, out_dir, config.train)
    return finished_run(out_dir, state.step, config.train.steps)


def _absolute_paths(config: RunConfig) -> RunConfig:
    """Actors run in other working directories: give them absolute paths. A deployment's
    REFINE_METRICS_DISCOVERY_DIR applies when the config leaves the discovery dir at its default."""
    config = config.model_copy(deep=True)
    config.train.out_dir = absolute_out_dir(config)
    discovery_env = os.environ.get("REFINE_METRICS_DISCOVERY_DIR")
    # The built-in path, given or defaulted (configs/service_tiny.yaml names it), gives way to the deployment's.
    if discovery_env and config.service.metrics_discovery_dir == BUILT_IN_DISCOVERY_DIR:
        config.service.metrics_discovery_dir = discovery_env
    config.service.metrics_discovery_dir = str(Path(config.service.metrics_discovery_dir).expanduser().resolve())
    for section, name in input_path_fields(config):
        value = getattr(section, name)
        if value and Path(value).expanduser().exists():
            setattr(section, name, str(Path(value).expanduser().resolve()))
    return config


def run(config: RunConfig, resume: bool = False, progress: bool = True, ray_address: str | None = None,
        redis_url: str | None = None, resume_command: list[str] | None = None, job_stage: bool = False) -> Stats:
    """Train with the distributed service; returns the learner's last step stats.

    Ray: `ray_address`, else `config.service.ray_address`, else RAY_ADDRESS, else a local Ray (an
    already initialized Ray is used as it is). Redis: `redis_url`, else `config.service.redis_url`,
    else REFINE_REDIS_URL, else an embedded server for this run. A stop (Ctrl-C, SIGTERM) says that
    `resume_command` goes on (default: `refine train OUT_DIR/config.yaml --resume`); a `job_stage` (of the main job)
    raises RunInterrupted for a stop asked during its last step too (refine.loop.run_steps does the same).
    """
    check_service_config(config)
    config = _absolute_paths(with_service_train_mode(config))  # config.yaml says what the service trains
    check_data_apart_from_run(config)
    start_cursor = 0  # where the learner's data stream starts: a resume's checkpoint says
    if resume:
        check_resumed_program(Path(config.train.out_dir), "refine")  # not a `refine posttrain` run
        finished = _finished_run(config)
        if finished is not None:
            return finished
        checkpoint = latest_checkpoint(config.train.out_dir)
        if checkpoint.exists():
            check_resumed_cursor(config, Path(config.train.out_dir))
            start_cursor = read_learner_state(checkpoint).cursor
        else:
            check_kept_without_latest(config.train.out_dir)
    else:
        check_inputs_outside_checkpoints(config)  # a fresh run empties its checkpoints folder
    tokenizer = run_tokenizer(config)
    if resume:
        check_resumed_tokenizer(config.train.out_dir, tokenizer)
        check_resumed_dtype(config.train.out_dir, DTYPES[config.train.dtype])
    config = fit_to_tokenizer(config, tokenizer)  # before any actor reads the model section
    check_data_source(config, tokenizer, start_cursor)  # its first batch: the run directory is not touched yet
    check_rollout_message_size(config)  # the model section is final only now (train.init_from)
    check_no_hidden_packages()
    plan = resolve_addresses(config, ray_address, redis_url)
    out_dir = Path(config.train.out_dir)
    if plan.redis_url:  # an unreachable Redis, or a run going on in this namespace, fails before Ray starts
        check_namespace_free(plan.redis_url, namespace_for(config, out_dir), claim_ttl_s(config), str(out_dir))
        warn_if_redis_evicts(plan.redis_url)
    # The driver holds the run directory until the run ends (config.yaml is written once the learner started).
    with (run_directory_lock(out_dir, "refine train (service)"), ray_for_run(config, plan.address) as cluster,
          redis_for_run(plan.redis_url, cluster) as url):
        orchestrator = Orchestrator(config, tokenizer, url, namespace_for(config, out_dir), resume=resume,
                                    progress=progress, resume_command=resume_command, job_stage=job_stage,
                                    ray_is_the_runs=cluster.started_here)
        cluster.last_resort.append(orchestrator.abandon)
        return orchestrator.run()


def data_cursor(position: DataPosition, batch: LocalBatch, source: str) -> DataCursor:
    """The DataCursor of the stream's next batch: its epoch (which `position` counts) and offset, and the source."""
    return DataCursor(epoch=position.advance(batch.cursor, batch.cursors), offset=batch.cursor, source=source[:200])


@dataclass
class Member:
    """One supervised actor: its role, consumer id and how to make a replacement."""

    role: str
    index: int
    stream: str
    group: str
    make: Callable[[str, Placement], Any]
    placement: Placement  # its bundle, kept across incarnations: a replacement takes its predecessor's room
    incarnation: int = 0
    actor: Any = None
    future: Any = None
    seen_alive: bool = False  # this incarnation sent a heartbeat

    @property
    def member_id(self) -> str:
        return f"{self.role}-{self.index}.{self.incarnation}"

    def start(self) -> None:
        self.placement.renew(self.member_id)
        self.actor = self.make(self.member_id, self.placement)
        self.future = self.actor.run.remote()
        self.seen_alive = False


def warn_if_redis_evicts(redis_url: str) -> None:
    """Say so when the user's Redis may evict the run's keys (services.redis_server.eviction_warning)."""
    client = connect(redis_url)
    try:
        warning = eviction_warning(client, redis_url)
    finally:
        client.close()
    if warning is not None:
        note(f"refine: warning: {warning}")


class Orchestrator:
    def __init__(self, config: RunConfig, tokenizer: Tokenizer, redis_url: str, namespace: str, resume: bool,
                 progress: bool, resume_command: list[str] | None = None, ray_is_the_runs: bool = False,
                 job_stage: bool = False) -> None:
        self.config = config
        self.job_stage = job_stage  # a stage of the main job: a stop ends it even after its last step
        # A local Ray of the run's own goes with the run (ray_for_run shuts it down, its placement group with it).
        self.ray_is_the_runs = ray_is_the_runs
        self.tokenizer = tokenizer  # encodes the documents it publishes
        self.redis_url = redis_url
        self.namespace = namespace
        self.resume = resume
        self.show_progress = progress
        self.out_dir = Path(config.train.out_dir)
        # What a stop (Ctrl-C, SIGTERM) says goes on (see run).
        self.resume_command = resume_command or ["refine", "train", str(self.out_dir / "config.yaml"), "--resume"]
        self.colocated = config.service.mode == "colocated"
        self.client = connect(redis_url)
        # Every key of the namespace but the claim expires this long after it was last written or refreshed
        # (services.key_expiry; the refresh starts with the run's streams).
        self.key_ttl_s = key_ttl_s(config)
        self.key_expiry: KeyExpiryKeeper | None = None
        self.broker = Broker(self.client, namespace, key_ttl_s=self.key_ttl_s)
        self.documents = DocumentStore(self.broker)
        self.metrics = Metrics(families=ROLE_FAMILIES["orchestrator"])
        self.endpoint = None
        self.config_json = config.model_dump_json()
        # Every actor compares its own sources with these, and refuses to start on others (a driver outside `ray job
        # submit --working-dir` beside nodes with another version installed).
        self.sources = own_stamp().model_dump_json()
        self.members: list[Member] = []
        self.reservation: Reservation | None = None  # every actor's bundle (`_reserve`)
        self.learner_placements: list[Placement] = []  # rank 0's, then the other ranks'
        self.placement_grace_s = PLACEMENT_GRACE_S
        self.restarts: dict[str, RestartWindow] = {}
        self.learner: Any = None
        self.learner_future: Any = None
        self.replicas: list[Any] = []  # learner ranks 1..R-1 (service.num_learners > 1)
        self.replica_futures: list[Any] = []
        self.published = 0
        self.stopping = False
        self.last_stats: Stats = {}
        self.bar: tqdm | None = None
        self.metrics_path: Path | None = None  # metrics.jsonl and events.jsonl, once restarted for this run
        self.events_path: Path | None = None
        self.data: Iterator[LocalBatch] | None = None
        self.unpublished: DocumentBatch | None = None
        self.publish_versions: dict[int, int] = {}  # unfinished batch index -> weight version out at its publish
        self.data_position = DataPosition(epoch=0, cursor=-1)
        self.recorded_through = 0  # every learner report numbered up to this one is written
        self.recorded_ahead: set[int] = set()  # reports written past a gap (redelivered after a Redis restart)
        self.read_interrupted = False  # a Ctrl-C landed in a report read: entries delivered to us, not yet written
        self.divergence = Divergence(config)  # ends a run whose every step is skipped as not finite
        self.diverged: ValueError | None = None  # raised by the loop once the reports that told it are recorded
        self._next_housekeeping = 0.0
        self._redis_outage_at = float("-inf")
        self.outage = OutageTolerance("orchestrator", outage_timeout_s(config.service.heartbeat_timeout_s))
        # Set once Redis was gone past the tolerance: the run's ending then skips its Redis commands, each of which
        # would wait out a socket timeout of a Redis that stopped answering.
        self.redis_lost = False
        self.stall_warning_s = STALL_WARNING_S
        # This driver, as the namespace's claim holds it (Broker.claim): JSON, never unpickled.
        self.claim_id = uuid.uuid4().hex
        self.claim_holder = json.dumps({"out_dir": str(self.out_dir), "host": socket.gethostname(),
                                        "pid": os.getpid(), "pid_namespace": current_pid_namespace(),
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "id": self.claim_id})
        self.claim_ttl_s = claim_ttl_s(config)
        self.claimed = False
        # Set once another run took the namespace (this driver's claim lapsed): the run's ending then leaves every key
        # of it alone, and does not wait for its learner, which it could only stop through that run's keys.
        self.namespace_taken = False
        self._last_step: int | None = None  # the learner's step when it last changed, and when that was
        self._step_changed_at = 0.0
        self._stall_said_at: float | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> Stats:
        self._claim_namespace()  # first: a run already in this namespace keeps its keys and its announcements
        discovery_dir = self.config.service.metrics_discovery_dir
        try:
            # A driver of this run that was killed (SIGKILL) left its members' announcements behind: targets that
            # stay down for good. No member of this run serves yet.
            withdraw_run_announcements(discovery_dir, self.namespace)
            self.endpoint = serve_metrics(self.metrics, role="orchestrator", instance=self.namespace,
                                          discovery_dir=discovery_dir, run=self.namespace)
            # Durable state lives in the checkpoint, not in Redis. A Redis restart now is ridden out, as later.
            retry_redis(self._fresh_streams, "set up the run's streams", self.outage.timeout_s)
            self._write_line(f"Redis namespace and Prometheus run label: {self.namespace}")
        except BaseException:
            if self.endpoint is not None:
                self.endpoint.close()
                self.endpoint = None
            self._release_namespace()
            raise
        # `ray job stop` and container runtimes send SIGTERM: stop as cleanly as on Ctrl-C (also when the run is
        # called in-process, without the CLI, which does the same). A row the disk refuses names the command that
        # resumes.
        with sigterm_as_ctrl_c(), resume_command_named(self.out_dir, self.resume_command):
            graceful = True
            try:
                self._keep_keys_alive()  # here: whatever ends the run from now on stops it (_delete_namespace)
                setup = self._start_learner()
                if not self.colocated:
                    self._start_members()  # they start while the learner sets up; they wait for its weights
                start = self._wait_for_learner(setup)
                self._write_config()  # only now: a resume the learner refused leaves the run's config.yaml as it was
                self._open_outputs(start)
                if start["step"] == 0:  # before the learner's first step
                    message = fresh_run_message(self.out_dir, clear_checkpoints(self.out_dir))
                    if message is not None:
                        self._write_line(message)
                self.data = self._document_batches(start["cursor"])
                span = shuffled_pass_span(self.config, self.tokenizer) if self.config.data.shuffle else 0
                self.data_position = DataPosition(epoch=start["epoch"], cursor=start["cursor"] if start["step"] else -1,
                                                  span=span)
                self.learner_future = self.learner.run.remote()
                self._loop()
                result = self._finish()
                step = int(result.get("step", 0) or 0)
                if self._stopped_early(step):
                    # Ctrl-C or SIGTERM: it stopped cleanly, but did not finish; the command must not say it did.
                    self._write_line(interrupted_message(step, self.config.train.steps, self.resume_command))
                    raise RunInterrupted
                return result
            except RunInterrupted:
                raise
            except KeyboardInterrupt:
                graceful = False  # the second Ctrl-C (the loop takes the first one gracefully): kill at once
                raise
            finally:
                try:
                    if graceful:
                        self._let_learner_stop()
                finally:  # a Ctrl-C outside its wait for the learner must not leave the actors and the keys
                    self._shutdown()
                if not graceful:  # after the kill: with the checkpoint the learner left
                    self._write_line(self._killed_message())

    def _fresh_streams(self) -> None:
        """The namespace emptied of an earlier run's keys (the claim kept), and the run's consumer groups made."""
        self.broker.delete_namespace(keep=("claim",))
        make_run_streams(self.broker, self.colocated)

    def _keep_keys_alive(self) -> None:
        """Start refreshing the expiry of the namespace's keys (services.key_expiry) until the run ends. Nothing a
        resume needs lives only in Redis (a run starts from an empty namespace and the learner's checkpoint): keys
        that expire under a driver that stalled that long cost the run, not its resume."""
        self.key_expiry = KeyExpiryKeeper(self.redis_url, self.namespace, self.key_ttl_s)
        self.key_expiry.start()

    def _claim_namespace(self) -> None:
        """Hold the run's Redis namespace, or refuse to start: two runs in one namespace (the same train.out_dir
        started twice, or one service.namespace given to two runs) delete each other's streams and records."""
        other = self.broker.claim(self.claim_holder, self.claim_ttl_s)
        if other is not None and driver_is_gone(other):  # killed on this host without cleaning up: resume now
            self.broker.take_over(self.claim_holder, self.claim_ttl_s)
            other = None
        if other is not None:
            raise namespace_in_use(self.namespace, other, self.claim_ttl_s, str(self.out_dir))
        self.claimed = True
        CLAIMS_HELD_HERE.add(self.claim_id)

    def _renew_claim(self) -> None:
        other = self.broker.renew_claim(self.claim_holder, self.claim_ttl_s)
        if other is not None:  # ours lapsed (this driver stalled past claim_ttl_s) and another run took it
            self.claimed = False
            self.namespace_taken = True
            CLAIMS_HELD_HERE.discard(self.claim_id)
            raise ServiceError(f"the Redis namespace {self.namespace!r} was taken by another run while this driver "
                               f"did not renew its claim: {describe_holder(other)}; this run stops, leaving that "
                               f"run's keys alone{self._resume_hint(None)}")

    def _release_namespace(self) -> bool:
        """Give the claim up; False when another run holds the namespace now (its keys are then that run's)."""
        if not self.claimed:
            return True
        self.claimed = False
        CLAIMS_HELD_HERE.discard(self.claim_id)
        return self.broker.release_claim(self.claim_holder)

    def _groups(self) -> list[tuple[str, str]]:
        return run_groups(self.colocated)

    def _remote(self, role: str, cls: type) -> Callable[[Placement], Any]:
        """`cls` as `role`'s actor class, created in a given bundle: call .remote(...) on what it returns."""
        actor_cls = ray.remote(cls)
        options = actor_options(self.config, role)
        return lambda placement: actor_cls.options(**options, max_restarts=0, scheduling_strategy=placement.strategy())

    def _reserve(self) -> Reservation:
        """Every actor's resources in one placement group (once, before any actor is created): Ray places the run's
        actors together or not at all, so none takes the room another needs."""
        if self.reservation is None:
            self.reservation = Reservation(actor_requests(self.config))
        return self.reservation

    def _place_learner(self) -> Placement:
        """The next learner rank's bundle: rank 0's first."""
        rank = len(self.learner_placements)
        placement = self._reserve().placement("learner" if rank == 0 else f"learner rank {rank}")
        self.learner_placements.append(placement)
        return placement

    def _start_learner(self) -> Any:
        """Reserve every actor's resources and create the learner actor; returns the future of its setup (starting
        weights published)."""
        from learner.learner import Learner

        self._reserve()
        self.learner = self._remote("learner", Learner)(self._place_learner()).remote(
            self.config_json, self.redis_url, self.namespace, self.resume, sources=self.sources)
        ranks = self.config.service.num_learners
        if ranks == 1:
            return self.learner.setup.remote()
        from learner.replica import LearnerReplica

        address = self._await_start(self.learner.data_parallel_address.remote(), self.learner_placements)
        replica_cls = self._remote("learner", LearnerReplica)
        self.replicas = [replica_cls(self._place_learner()).remote(self.config_json, rank, address, self.resume,
                                                                   sources=self.sources)
                         for rank in range(1, ranks)]
        self.replica_futures = [replica.run.remote() for replica in self.replicas]
        return self.learner.setup.remote(address)

    def _wait_for_learner(self, setup: Any) -> dict:
        """The step, data cursor and weight version the run continues from."""
        return json.loads(self._await_start(setup, self.learner_placements))

    def _await_start(self, future: Any, placements: list[Placement]) -> Any:
        """ray.get(future), a call that needs the learner's actors (`placements`) started: it may take
        ACTOR_START_TIMEOUT_S from when Ray placed them. Time spent waiting for room does not count: Ray places the
        run's actors once they fit the nodes together (one frees up or joins), and the wait is said so. A learner rank
        1..R-1 that failed meanwhile ends the wait with its error: rank 0 would wait for it until its group's
        timeout, and then tell only that."""
        while True:
            ready, _ = ray.wait([future], timeout=START_POLL_S)
            failed_ranks = self._failed_ranks(wait_s=0)
            if failed_ranks:
                raise ServiceError(f"the learner failed to start: {failed_ranks}")
            try:
                self._renew_claim()  # the start can take minutes (waiting for room on the cluster)
            except TRANSIENT as exc:  # a Redis outage meanwhile is ridden out as the loop rides it out
                self._redis_failed(exc)
            else:
                self._redis_back()
            if ready:
                try:
                    return ray.get(future)
                except ray.exceptions.RayError as exc:
                    raise ServiceError(f"the learner failed to start: {describe_failure(exc)}") from exc
            self._note_unplaced()
            if (all(placement.placed() for placement in placements)
                    and min(placement.since_placed() for placement in placements) > ACTOR_START_TIMEOUT_S):
                raise ServiceError(f"the learner did not start within {ACTOR_START_TIMEOUT_S:.0f}s of its placement "
                                   f"(cluster resources: {ray.available_resources()})")

    def _note_unplaced(self) -> None:
        """Say once, when Ray has not placed the run's actors after the grace, what each asks for and what nodes have
        free."""
        note = None if self.reservation is None else self.reservation.waiting_note(self.placement_grace_s)
        if note is not None:
            self._write_line(note)

    def _write_config(self) -> None:
        """config.yaml, whole or not at all (temp file + rename): `refine train DIR/config.yaml --resume`
        must always find a config that fits the checkpoint."""
        write_atomically(self.out_dir / "config.yaml", dump_config(self.config))

    def _start_members(self) -> None:
        from rollout_workers.worker import ROLE as WORKER_ROLE
        from rollout_workers.worker import RolloutWorker
        from services.reward_actor import ROLE as REWARD_ROLE
        from services.reward_actor import RewardReplica

        service = self.config.service
        worker_cls = self._remote("rollout_worker", RolloutWorker)
        reward_cls = self._remote("reward", RewardReplica)

        def make_worker(member_id: str, placement: Placement) -> Any:
            return worker_cls(placement).remote(self.config_json, member_id, self.redis_url, self.namespace,
                                                sources=self.sources)

        def make_reward(member_id: str, placement: Placement) -> Any:
            return reward_cls(placement).remote(self.config_json, member_id, self.redis_url, self.namespace,
                                                sources=self.sources)

        reservation = self._reserve()
        for index in range(service.num_rollout_workers):
            placement = reservation.placement(f"{WORKER_ROLE}-{index}")
            self.members.append(Member(WORKER_ROLE, index, DOCUMENTS, ROLLOUT_GROUP, make_worker, placement))
        for index in range(service.num_reward_replicas):
            placement = reservation.placement(f"{REWARD_ROLE}-{index}")
            self.members.append(Member(REWARD_ROLE, index, ROLLOUTS, REWARD_GROUP, make_reward, placement))
        for member in self.members:
            member.start()

    def _open_outputs(self, start: dict) -> None:
        """metrics.jsonl and events.jsonl as of the learner's starting point, with the reports its checkpoint
        kept that they lack; `start`: what Learner.setup returned."""
        start_step, reports = start["step"], start["reports"]
        self.recorded_through = reports  # the learner numbers its next report reports + 1
        self.metrics_path, self.events_path = self.out_dir / "metrics.jsonl", self.out_dir / "events.jsonl"
        restart_metrics(self.metrics_path, start_step)
        restart_events(self.events_path, start_step, reports)
        restored = 0
        if self.resume and (start_step or reports):
            restored = restore_reports(latest_checkpoint(self.out_dir), self.out_dir, self.config.train)
        self.bar = progress_bar(total=self.config.train.steps, initial=start_step,
                                desc=f"train[service:{self.config.service.mode}]", disable=not self.show_progress)
        if self.resume and not start_step:
            self._write_line(f"no checkpoint in {self.out_dir / 'checkpoints'} to resume from: starting at step 0")
        if restored:
            self._write_line(f"restored {restored} reports of the learner's checkpoint that the last run had not "
                             f"written to metrics.jsonl / events.jsonl")
        changed = check_source(self.config, self.out_dir, resumed=start_step > 0)
        if changed:
            self._write_line(f"warning: {changed}")
        for warning in (warmup_warning(self.config), rate_change_warning(self.config, self.metrics_path, start_step)):
            if warning is not None:
                self._write_line(warning)

    def _document_batches(self, cursor: int) -> Iterator[LocalBatch]:
        return document_batches(self.config, self.tokenizer, start_cursor=cursor)

    # -- main loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        pause = False
        while True:
            try:
                if pause:
                    pause = False
                    time.sleep(REDIS_RETRY_PAUSE_S)  # here, not in the except clause: Ctrl-C stops gracefully
                # Before any Redis call: a learner that gave up on Redis (or failed) ends the run during an
                # outage too.
                ready, _ = ray.wait([self.learner_future], timeout=0)
                if ready:
                    return
                self._drain_reports(block_ms=100)
                if self.diverged is not None:
                    raise self.diverged
                if not self.stopping:
                    self._feed()
                    self._supervise()
                self._housekeeping()
                self._redis_back()
            except KeyboardInterrupt:
                if self.stopping:
                    raise
                self.stopping = True
                self._write_line("stopping: the learner checkpoints, then every role exits (Ctrl-C again to kill)")
                self._stop_flag("interrupted")
            except TRANSIENT as exc:
                self._redis_failed(exc)
                pause = True

    def _redis_failed(self, exc: BaseException) -> None:
        """Ride out a Redis outage for as long as the learner does (outage_timeout_s), then end the run."""
        self._redis_outage_at = time.monotonic()
        url, timeout = redact_url(self.redis_url), self.outage.timeout_s
        try:
            first = self.outage.record(exc)
        except RedisOutage as outage:
            self.redis_lost = True
            # The learner gives up on Redis after as long, and checkpoints first: wait for it, so that the
            # message can point at that checkpoint.
            self._let_learner_stop()
            raise ServiceError(f"Redis at {url} unreachable for {outage.elapsed_s:.0f}s ({timeout:.0f}s tolerated; "
                               f"{type(exc).__name__}: {exc}); "
                               f"the run stopped{self._resume_hint(None)}") from exc
        if first:
            self._write_line(f"Redis at {url} unavailable ({exc}); retrying for up to {timeout:.0f}s")

    def _redis_back(self) -> None:
        if self.outage.since is not None:
            self._write_line(f"Redis at {redact_url(self.redis_url)} is back after "
                             f"{time.monotonic() - self.outage.since:.0f}s")
            self.outage.succeeded()

    def _progress(self) -> LearnerProgress:
        return read_progress(self.broker) or LearnerProgress()

    def _feed(self) -> None:
        """Publish document batches as far as the pacing rule allows (see the module docstring)."""
        progress = self._progress()
        service = self.config.service
        remaining = self.config.train.steps - progress.step
        unfinished = self.published - progress.unbroken  # those finished past a batch still unfinished count too
        allowed = service.batches_in_flight
        current = max(progress.weight_version, 0)
        for index in [index for index in self.publish_versions if index < progress.unbroken]:
            del self.publish_versions[index]  # finished
        if not self.colocated:
            # The oldest unfinished batch's version, not the newest: with several workers batches finish out of
            # order, so any unfinished batch may be trained after all the others, and would be dropped as stale
            # (its documents never trained) had the rule counted from newer weights.
            version = min([current, *self.publish_versions.values()])
            allowed = min(allowed, service.max_staleness + 1 - (progress.step - version))
        while unfinished < min(allowed, remaining):
            self.publish_versions[self.published] = current
            self._publish_next()
            unfinished += 1

    def _publish_next(self) -> None:
        """Publish the next document batch. A batch whose publish failed (Redis restarting) is kept
        and published again, under the same id, on the next call: no document is skipped."""
        if self.unpublished is None:
            self.unpublished = self._next_message()
        message = self.unpublished
        # Checked at each publish, not only every few seconds: a Redis that came back empty would otherwise get a
        # new count from this publish and pass every later check.
        self._check_redis_kept_the_run()
        if not self.colocated:
            self.documents.put(message)  # before the stream entry: the learner reads it by id later
        # Before the stream entry too: the learner ignores batches of ids past this count (another run's, forged).
        write_published(self.broker, self.published + 1)
        self.broker.publish(DOCUMENTS, message)
        self.unpublished = None
        self.published += 1
        self.metrics.documents.inc(message.batch_size)

    def _next_message(self) -> DocumentBatch:
        assert self.data is not None
        batch = next(self.data)
        ids = batch.input_ids
        if int(ids.max()) < 2**31:
            ids = ids.to(torch.int32)  # half the bytes on the wire
        return DocumentBatch(
            batch_id=document_batch_id_for(self.published), doc_ids=batch.doc_ids, token_ids=ids, lengths=batch.lengths,
            cursor=data_cursor(self.data_position, batch, self.config.data.source),
        )

    def _drain_reports(self, block_ms: int | None, reclaim_idle_ms: int | None = None) -> int:
        """Write the learner's new reports, and with `reclaim_idle_ms` those delivered to this orchestrator at
        least that long ago but never acknowledged; returns how many were read."""
        reports = []
        if self.read_interrupted:  # the graceful stop's reads take back what the interrupted one was handed
            reclaim_idle_ms, self.read_interrupted = 0, False
        try:
            if reclaim_idle_ms is not None:  # delivered while Redis went down (the reply lost), or before a Ctrl-C;
                # read first: they are older than any new report, and metrics.jsonl keeps the steps in order
                reports = self.broker.reclaim(LEARNER_REPORTS, ORCHESTRATOR_GROUP, "orchestrator", StepReport,
                                              min_idle_ms=reclaim_idle_ms)
            reports += self.broker.consume(LEARNER_REPORTS, ORCHESTRATOR_GROUP, "orchestrator", StepReport,
                                           count=100, block_ms=block_ms)
        except KeyboardInterrupt:
            self.read_interrupted = True
            raise
        except RedisStateLost as exc:  # the reports' stream is gone: Redis lost the run's state
            raise self._state_lost(f"{exc}: ") from exc
        confirmed = self.recorded_through
        for entry_id, report in reports:
            # A report recorded but not acknowledged comes back once.
            if report.seq > self.recorded_through and report.seq not in self.recorded_ahead:
                self._record(report)
                self.recorded_ahead.add(report.seq)
                while self.recorded_through + 1 in self.recorded_ahead:
                    self.recorded_through += 1
                    self.recorded_ahead.remove(self.recorded_through)
            self.broker.ack(LEARNER_REPORTS, ORCHESTRATOR_GROUP, [entry_id])
        if self.recorded_through > confirmed:  # the learner stops keeping them in its checkpoints
            write_recorded(self.broker, self.recorded_through)
        return len(reports)

    def _record(self, report: StepReport) -> None:
        if report.kind != "step":
            self._write_event(event_row(report, time.time()))
            return
        assert self.metrics_path is not None and self.bar is not None
        row = dict(report.stats)
        if logged(self.config.train, report):
            # A row the disk refuses ends the run, naming the file; the learner's checkpoint keeps the report.
            write_row(self.metrics_path, row, "refine")
        # Raised by the loop, once every report it read is recorded and acknowledged.
        self.diverged = self.diverged or self.divergence.add(report.step, report.stats)
        self.last_stats = report.stats
        self.bar.update(report.step - self.bar.n)
        self.bar.set_postfix({key: f"{float(row[key]):.3f}" for key in ("loss", "reward_mean") if key in row})

    def _write_event(self, row: dict) -> None:
        """events.jsonl: what happened besides optimizer steps (dropped batches, restarted roles)."""
        assert self.events_path is not None
        write_row(self.events_path, row, "refine")

    def _supervise(self) -> None:
        if not self.members:
            return
        ages_by_role = {role: self.broker.heartbeats(role) for role in {m.role for m in self.members}}
        timeout = self.config.service.heartbeat_timeout_s
        # Nobody could beat while Redis was down: judge heartbeats only once it has been back a while.
        trust_heartbeats = time.monotonic() - self._redis_outage_at > timeout
        grace = max(ACTOR_START_TIMEOUT_S, timeout)
        self._note_unplaced()
        for member in self.members:
            reason = None
            age = ages_by_role[member.role].get(member.member_id)
            member.seen_alive = member.seen_alive or age is not None
            ready, _ = ray.wait([member.future], timeout=0)
            if ready:
                try:
                    ray.get(member.future)
                    reason = "its loop returned before the run ended"
                except ray.exceptions.RayError as exc:
                    if isinstance(actor_error(exc), RedisStateLost):  # a replacement would find it gone too
                        raise self._state_lost(f"{actor_error(exc)}: ") from exc
                    # Cut at a word (a line of events.jsonl and of the console): Ray's texts run to pages.
                    reason = f"its actor died ({textwrap.shorten(describe_failure(exc), 300, placeholder=' ...')})"
                    if not member.seen_alive:  # it failed while starting: a replacement would too
                        raise ServiceError(f"{member.member_id} failed to start: {describe_failure(exc)}") from exc
            elif not member.placement.placed():
                continue  # the run's actors wait for room (said by _note_unplaced): a replacement would wait the same
            elif trust_heartbeats and age is not None and age > timeout:
                reason = f"no heartbeat for {age:.1f}s"
            elif trust_heartbeats and age is None and member.placement.since_placed() > grace:
                reason = f"it never sent a heartbeat in {grace:.0f}s"
            if reason is not None:
                self._restart(member, reason)

    def _restart(self, member: Member, reason: str) -> None:
        count = self.restarts.setdefault(member.role, RestartWindow()).add(time.monotonic())
        if count > MAX_RESTARTS_PER_ROLE:
            raise ServiceError(f"{member.member_id} failed ({reason}); {member.role} restarted "
                               f"{MAX_RESTARTS_PER_ROLE} times already within {RESTART_WINDOW_S / 60:.0f} minutes"
                               f"{self._resume_hint(None)}")
        old = member.member_id
        ray.kill(member.actor, no_restart=True)
        remove_member_files(self.config, self.namespace, member.role, old)
        self.broker.forget(member.role, old)
        released = release_consumer(self.broker, member.stream, member.group, old)
        self.broker.client.delete(self.broker.key("members", old))  # its record: one more per restart otherwise
        member.incarnation += 1
        member.start()
        self._write_event({"time": round(time.time(), 3), "event": "restart", "member": old,
                           "replacement": member.member_id, "reason": reason, "released_entries": released})
        self._write_line(f"{old} restarted as {member.member_id}: {reason}; {released} pending entries released")

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
        self._renew_claim()
        self._drain_reports(block_ms=None, reclaim_idle_ms=REPORT_RECLAIM_IDLE_MS)
        self._check_redis_kept_the_run()
        self._check_dead_letters()
        current = {member.member_id for member in self.members}
        for stream, group in {(member.stream, member.group) for member in self.members}:
            delete_idle_consumers(self.broker, stream, group, keep=current)
        for stream, group in self._groups():
            trim_acknowledged(self.broker, stream)
            self.metrics.stream_length.labels(stream=stream).set(self.broker.length(stream))
            self.metrics.stream_pending.labels(stream=stream, group=group).set(self.broker.pending(stream, group))
        self._check_stall(self._progress().step)

    def _check_stall(self, step: int, now: float | None = None) -> None:
        """Say so when the learner's step has not moved for stall_warning_s, and again every stall_warning_s
        (`now`: time.monotonic() by default)."""
        now = time.monotonic() if now is None else now
        if step != self._last_step:
            self._last_step, self._step_changed_at, self._stall_said_at = step, now, None
            return
        quiet = now - self._step_changed_at
        said = self._stall_said_at
        if quiet < self.stall_warning_s or (said is not None and now - said < self.stall_warning_s):
            return
        self._stall_said_at = now
        self._write_line(f"warning: the learner has taken no step for {quiet:.0f}s (it is at step {step}); "
                         f"{self._stall_report()}")

    def _stall_report(self) -> str:
        """Where the run's work waits: each stream's entries not yet taken and who holds the others, and how long ago
        each role last beat (a fresh heartbeat with entries held for long: a loop that hangs)."""
        parts = []
        for stream, group in self._groups():
            if stream == LEARNER_REPORTS:
                continue
            holders = self.broker.holders(stream, group)
            held = ", ".join(f"{count} by {name}" for name, count in sorted(holders.items())) or "none held"
            parts.append(f"{stream}: {self.broker.undelivered(stream, group)} waiting, {held}")
        from learner.learner import ROLE as LEARNER_ROLE

        ages = {}
        for role in sorted({LEARNER_ROLE, *(member.role for member in self.members)}):
            ages |= self.broker.heartbeats(role)
        beats = ", ".join(f"{name} {age:.0f}s ago" for name, age in sorted(ages.items())) or "none"
        return "; ".join(parts) + f"; last heartbeats: {beats}"

    def _check_redis_kept_the_run(self) -> None:
        """A Redis that came back empty (restarted without persistence, or flushed) lost the streams, the batches in
        flight and the weights: the run would wait for them for ever, or drop every batch as stale; one that lost
        its last writes (killed with appendfsync everysec) can have lost a published batch, which the run would wait
        for. The count of published batches, written before each publish, tells: it is gone, or behind."""
        recorded = read_published(self.broker)
        if self.published and (recorded is None or recorded < self.published):
            raise self._state_lost()
        if self.key_expiry is not None:
            self.key_expiry.found_whole()

    def _state_lost(self, detail: str = "") -> ServiceError:
        expired = None if self.key_expiry is None else self.key_expiry.expired_after_s()
        if expired is not None:  # no Redis failure: this driver let them expire
            return ServiceError(f"Redis at {redact_url(self.redis_url)} no longer holds this run's state ({detail}its "
                                f"keys expired: this driver did not refresh their expiry for {expired:.0f}s, longer "
                                f"than their {self.key_ttl_s:g}s time to live (service.key_ttl_s), as it was "
                                f"suspended or stalled); the run stopped{self._resume_hint(None)}")
        return ServiceError(f"Redis at {redact_url(self.redis_url)} lost this run's state ({detail}its streams and "
                            f"records are gone, or its last writes: restarted without persistence, flushed, or killed "
                            f"before its append-only file had them); the run stopped{self._resume_hint(None)}")

    def _check_dead_letters(self) -> None:
        """Every message here comes from the run's own roles: one that could not be used is a bug or
        a configuration error (a reward that cannot score these rollouts, a batch that crashes every
        worker, rollouts or a scored batch over the codec's max_message_bytes: its reason names the
        message, its size, the limit and the settings that size it). Waiting for it would hang the run,
        so the run ends with its error, quoted."""
        for stream in (DOCUMENTS, ROLLOUTS, SCORED, LEARNER_REPORTS):
            letters = self.broker.dead_letters(stream, count=1)
            if letters:
                raise ServiceError(f"a message of stream {stream!r} could not be used "
                                   f"(entry {letters[0].entry_id}): {letters[0].error}")

    # -- ending ---------------------------------------------------------------------------------

    def _resume_hint(self, failure: BaseException | None) -> str:
        """How to go on after `failure`: only when a resume can get past it (a configuration error would
        fail again) and there is a checkpoint to resume from."""
        if failure is not None and isinstance(actor_error(failure), ValueError):
            return ""
        if not latest_checkpoint(self.out_dir).exists():
            return ""
        # The command a stop prints too: with the run's --redis-url and --ray-address (password hidden).
        return f"; resume from its last checkpoint with `{shlex.join(self.resume_command)}`"

    def _killed_message(self) -> str:
        """What a run killed at once (a second Ctrl-C, or one before it trains) says: the step its last checkpoint
        holds, and how to go on."""
        checkpoint = latest_checkpoint(self.out_dir)
        if not checkpoint.exists():
            return killed_message(None, self.config.train.steps, self.resume_command)
        try:
            step = read_learner_state(checkpoint).step
        except (OSError, ValueError) as exc:  # its message names the file
            return f"killed at once (its last checkpoint: {exc}); resume with `{shlex.join(self.resume_command)}`"
        return killed_message(step, self.config.train.steps, self.resume_command)

    def _stop_flag(self, reason: str) -> None:
        if self.redis_lost:
            return  # the roles give up on Redis by themselves
        if self.namespace_taken:
            return  # another run's flag now: its roles would stop
        try:
            self.broker.request_stop(reason)
        except TRANSIENT as exc:
            logger.warning("could not set the stop flag: %s", exc)

    def _finish(self) -> Stats:
        try:
            result = json.loads(ray.get(self.learner_future))
        except ray.exceptions.RayError as exc:
            if isinstance(actor_error(exc), RedisStateLost):  # the learner saw it first, and checkpointed
                raise self._state_lost(f"{actor_error(exc)}: ") from exc
            if self.stopping and isinstance(exc, ray.exceptions.RayActorError):
                # A stop signal to the whole process group (timeout, systemd, Slurm) reaches a local Ray too: the
                # learner may go with it, before its checkpoint. The run stopped as asked, from its last one.
                checkpoint = latest_checkpoint(self.out_dir)
                step = read_learner_state(checkpoint).step if checkpoint.exists() else 0
                self._write_line("the learner stopped with Ray, before its checkpoint (the signal reached Ray too)")
                self._write_line(interrupted_message(step, self.config.train.steps, self.resume_command))
                raise RunInterrupted from exc
            ranks = self._failed_ranks()  # rank 0's own error is then often only the connection the rank lost
            cause = f" ({ranks})" if ranks else ""
            raise ServiceError(f"the learner failed: {describe_failure(exc)}{cause}{self._resume_hint(exc)}") from exc
        self._check_replicas(result)
        self._stop_flag("finished")
        # Every report, those a Ctrl-C left delivered but unwritten too (the orchestrator is their only reader):
        # there may be more than one read returns.
        while self._drain_reports(block_ms=None, reclaim_idle_ms=0):
            pass
        # Only members Ray placed: an actor still waiting for its bundle never returns, and would hold the run's end
        # for STOP_GRACE_S.
        futures = [m.future for m in self.members if m.future is not None and m.placement.placed()]
        if futures:
            ray.wait(futures, num_returns=len(futures), timeout=self._stop_grace_s())
        if self.metrics_path is not None:
            unplotted = plot_run(self.out_dir)
            if unplotted is not None:
                self._write_line(unplotted)
        skipped = int(self.last_stats.get("skipped_steps", 0) or 0)
        if skipped:
            self._write_line(f"warning: {skipped} steps of this run so far skipped an update for a non-finite loss or "
                             f"gradient (skipped_nonfinite in metrics.jsonl; {describe_rates(self.config.optim)})")
        return result or self.last_stats

    def _failed_ranks(self, wait_s: float = 5.0) -> str:
        """Which of the learner's ranks 1..R-1 failed, and how (waiting up to `wait_s` for Ray to tell); "" if none."""
        if not self.replica_futures:
            return ""
        ready, _ = ray.wait(self.replica_futures, num_returns=len(self.replica_futures), timeout=wait_s)
        failures = []
        for rank, future in enumerate(self.replica_futures, start=1):
            if future not in ready:
                continue
            try:
                ray.get(future)
            except ray.exceptions.RayError as error:
                failures.append(f"learner rank {rank} failed: {describe_failure(error)}")
        return "; ".join(failures)

    def _check_replicas(self, result: Stats) -> None:
        """Learner ranks 1..R-1 end when rank 0 does, with bit-equal weights."""
        for rank, future in enumerate(self.replica_futures, start=1):
            try:
                replica = json.loads(ray.get(future, timeout=self._stop_grace_s()))
            except ray.exceptions.GetTimeoutError as exc:
                raise ServiceError(f"learner rank {rank} did not end within {self._stop_grace_s():.0f}s") from exc
            except ray.exceptions.RayError as exc:
                raise ServiceError(f"learner rank {rank} failed: {describe_failure(exc)}") from exc
            if replica["weights_digest"] != result.get("weights_digest"):
                raise ServiceError(f"learner rank {rank} ended with weights that differ from rank 0's")

    def _stopped_early(self, step: int) -> bool:
        """Whether a stop (Ctrl-C, SIGTERM) ends the command as interrupted: before train.steps, or, for a stage of
        the main job, at any step (the job must not go on to its next stage)."""
        return self.stopping and (step < self.config.train.steps or self.job_stage)

    def _stop_grace_s(self) -> float:
        """How long the run's end waits for an actor to return (see SIGNALLED_STOP_GRACE_S)."""
        return SIGNALLED_STOP_GRACE_S if self.ray_is_the_runs and sigterm_received() else STOP_GRACE_S

    def _let_learner_stop(self) -> None:
        """On an error of the orchestrator (a bad data row, a dead letter, a role restarted too often),
        let a learner that is still training checkpoint before its actor is killed: set the stop flag
        and wait up to STOP_GRACE_S for it (and its other ranks) to return. Otherwise every step since
        the last checkpoint is lost, all of them with the default checkpoint_every=0."""
        if self.learner_future is None or self.namespace_taken:
            return  # not training yet: nothing to save; or it could be told to stop only through another run's keys
        ready, _ = ray.wait([self.learner_future], timeout=0)
        if ready:
            return  # returned already (finished, stopped or failed): it stopped its other ranks itself
        futures = [self.learner_future, *self.replica_futures]
        self._stop_flag("shutdown")
        self._write_line(f"the run failed: waiting up to {STOP_GRACE_S:.0f}s for the learner to checkpoint "
                         f"(Ctrl-C to kill it at once)")
        try:
            ray.wait(futures, num_returns=len(futures), timeout=STOP_GRACE_S)
        except KeyboardInterrupt:
            return
        if self.redis_lost:
            return  # its checkpoint keeps the reports of the steps it took meanwhile: a resume writes them
        try:
            # The steps it took meanwhile go to metrics.jsonl too: it must match the checkpoint on resume.
            while self._drain_reports(block_ms=None, reclaim_idle_ms=0):
                pass
        except (redis.RedisError, OSError, ServiceError) as exc:  # ServiceError: Redis lost the run's state
            logger.warning("could not read the learner's last reports: %s", exc)

    def _shutdown(self) -> None:
        """Kill the actors and delete the run's keys. Ctrl-C does nothing meanwhile: the run's outcome is settled, and a
        second Ctrl-C landing here (as a graceful stop ends) cut it short, every key of the run left in Redis. SIGTERM
        still ends it."""
        with ctrl_c_ignored():
            self._stop_flag("shutdown")
            # Prometheus's targets first, before any call to Ray: a SIGTERM to the whole process group (timeout,
            # systemd, Slurm) also ends a local Ray, whose next call aborts this process, and a target left announced
            # stays down for good (RefineRoleDown fires). Members that finished withdrew their own; killed ones could
            # not.
            if self.endpoint is not None:
                self.endpoint.close()
                self.endpoint = None
            members = self._withdraw_targets()
            for actor in [self.learner, *self.replicas, *(m.actor for m in self.members)]:
                if actor is not None:
                    try:
                        ray.kill(actor, no_restart=True)
                    except Exception:  # already gone
                        pass
            for role, member_id in members:  # the rest of what killed members leave (their targets went above)
                remove_staged_checkpoints(self.config, self.namespace, role, member_id)
            if self.bar is not None:
                self.bar.close()
            self._delete_namespace()
            # Last, and only on a cluster that outlives the run: with a SIGTERM to the whole process group, a local
            # Ray's GCS is gone, and removing the group waited 60 s for it, then ended the process, the Redis keys
            # (two copies of the weights among them) and the embedded Redis' folder left behind.
            if self.reservation is not None and not self.ray_is_the_runs:
                try:
                    self.reservation.release()  # every actor's bundle, once
                except Exception as exc:  # Ray went away: it took the group with it
                    logger.warning("could not release the run's placement group: %s", exc)
            self.client.close()

    def abandon(self) -> None:
        """What the run's end must do when the driver is abandoned, from another thread while this one is stuck in a
        call to a Ray that a signal ended (services.ray_runtime): its Prometheus targets withdrawn and its Redis keys
        deleted. Nothing here calls Ray."""
        self._withdraw_targets()
        self._delete_namespace()

    def _withdraw_targets(self) -> list[tuple[str, str]]:
        """Withdraw every role's Prometheus target of this run; returns the (role, member id) pairs."""
        from learner.learner import MEMBER_ID, ROLE

        members = [(ROLE, MEMBER_ID), *((m.role, m.member_id) for m in self.members)]
        for role, member_id in members:
            withdraw_announcements(self.config.service.metrics_discovery_dir, role, member_id, self.namespace)
        return members

    def _delete_namespace(self) -> None:
        """The run's Redis keys, unless Redis is lost or another run holds the namespace now."""
        if self.key_expiry is not None:  # first: a refresh must not outlive the run's end
            self.key_expiry.stop()
        if self.redis_lost:
            logger.warning("Redis is unreachable: the run's keys (namespace %s) stay in it", self.namespace)
        elif self.namespace_taken:
            logger.warning("the Redis namespace %s is another run's now: its keys stay", self.namespace)
        else:
            try:
                self._renew_claim()  # still ours (taken again if it lapsed and nobody took it): its keys are ours
                self.broker.delete_namespace(keep=("claim",))
                self._release_namespace()
            except ServiceError as exc:  # another run took it meanwhile
                logger.warning("%s", exc)
            except (redis.RedisError, OSError) as exc:
                logger.warning("could not delete namespace %s: %s", self.namespace, exc)

    def _write_line(self, text: str) -> None:
        """A note above the progress bar, or a log line without one; never raises (see refine.runtime.note): a
        stderr gone is no reason to fail a run, nor to be taken for Redis' failure in _loop."""
        if self.bar is not None and self.show_progress:
            note(text)
        else:
            logger.warning(text)
