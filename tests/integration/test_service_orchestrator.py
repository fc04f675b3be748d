"""The driver's own rules, without actors: failures on one line, events and reports on
resume, and what is checked before Ray and Redis start."""

from __future__ import annotations

import itertools
import json
import shlex
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
from ray.exceptions import ActorDiedError, RayTaskError

from learner.checkpoint import LearnerState
from refine.config import TrainConfig, load_config, run_tokenizer
from refine.config_parsing import ConfigError
from refine.data.sources import DataSourceError
from refine.data.stream import DataPosition, document_batches
from refine_vllm.settings import staging_prefix
from rollout_workers.engines import engine_owner
from service_helpers import events, step_rows, tiny_config
from refine.tokenizer import load_tokenizer
from services.broker import Broker
from services.failures import ServiceError, describe_failure
from services.member_files import remove_member_files
from services.messages import DataCursor, DocumentBatch
from services.orchestrator import Orchestrator, run
from services.progress import LearnerProgress, StepReport, read_published, write_progress, write_published
from services.report_files import restore_reports
from services.resilience import RedisStateLost
from services.redis_server import connect
from services.streams import DOCUMENTS, LEARNER_REPORTS, check_rollout_message_size

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # a run that got as far as Redis would fail on it


def _task_error(cause: BaseException, function: str = "Learner.__init__") -> RayTaskError:
    """What ray.get raises for an error in an actor method: a RayTaskError carrying a remote traceback."""
    traceback = "Traceback (most recent call last):\n  File \"learner.py\", line 1\n" + repr(cause)
    return RayTaskError(function, traceback, cause, proctitle=f"ray::{function}()", pid=1, ip="10.0.0.1")


def test_actor_failures_are_told_on_one_line_without_the_remote_traceback() -> None:
    config_error = ValueError("train.device='cuda', but this machine has no CUDA GPU\nset train.device=cpu")
    # __init__ raised: the actor died, its creation task's error inside.
    assert describe_failure(ActorDiedError(_task_error(config_error))) == (
        "train.device='cuda', but this machine has no CUDA GPU set train.device=cpu")
    # A method raised: the type is kept where the message alone does not say what happened.
    assert describe_failure(_task_error(KeyError("loss"), "Learner.run").as_instanceof_cause()) == "KeyError: 'loss'"
    # No Python error at all (killed, out of memory): Ray's own first line.
    died = describe_failure(ActorDiedError())
    assert died == "ActorDiedError: The actor died unexpectedly before finishing this task."


def test_resume_is_advised_only_where_it_can_help(redis_url: str, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, config.service.namespace, resume=False,
                                progress=False)
    crash = _task_error(RuntimeError("CUDA error: an illegal memory access"), "Learner.run").as_instanceof_cause()
    bad_setting = _task_error(ValueError("refine.reward='bogus' is unknown"), "Learner.run").as_instanceof_cause()
    try:
        assert orchestrator._resume_hint(crash) == ""  # no checkpoint to resume from
        (tmp_path / "run" / "checkpoints" / "latest").mkdir(parents=True)
        assert orchestrator._resume_hint(crash) == (
            f"; resume from its last checkpoint with `refine train {tmp_path / 'run' / 'config.yaml'} --resume`")
        assert orchestrator._resume_hint(bad_setting) == ""  # a resume would fail the same way
    finally:
        orchestrator.client.close()
    # The run's own command, as a stop prints it: with the addresses it was given.
    command = ["refine", "train", str(tmp_path / "run" / "config.yaml"), "--redis-url", "redis://:***@h:1/0",
               "--resume"]
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, config.service.namespace, resume=False,
                                progress=False, resume_command=command)
    try:
        assert orchestrator._resume_hint(crash) == f"; resume from its last checkpoint with `{shlex.join(command)}`"
    finally:
        orchestrator.client.close()


def test_a_batch_that_hangs_holds_publishing_back(redis_url: str, tmp_path: Path, monkeypatch) -> None:
    """Batches finished past one still unfinished count as in flight: the checkpoint's data cursor stands before
    the unfinished one, so publishing on would let a resume train ever more batches again (31 and 50 with
    batches_in_flight=4 and max_staleness=1, when the learner's count of finished batches paced it)."""
    config = tiny_config(tmp_path, "service.batches_in_flight=4", "service.max_staleness=100", "train.steps=1000")
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, config.service.namespace, resume=False,
                                progress=False)
    published = []
    monkeypatch.setattr(orchestrator, "_publish_next", lambda: published.append(orchestrator.published))
    try:
        # 10 published, 9 finished, but batch 2 still out: 7 finished past it, 8 in flight (from batch 2 on).
        orchestrator.published = 10
        write_progress(orchestrator.broker, LearnerProgress(step=9, finished=9, unbroken=2, weight_version=9))
        orchestrator._feed()
        assert published == []
        # It finished: the unbroken run reaches all 10, and 4 more go out.
        write_progress(orchestrator.broker, LearnerProgress(step=10, finished=10, unbroken=10, weight_version=10))
        orchestrator._feed()
        assert len(published) == 4
    finally:
        orchestrator.client.close()


def test_pacing_counts_from_the_oldest_unfinished_batchs_weights(redis_url: str, tmp_path: Path, monkeypatch) -> None:
    """With several workers a later batch can be trained first: pacing by the newest weights let docs-8 (rolled out
    with version 7) go out while docs-7 (version 6) was unfinished, and docs-7, trained after docs-8 at step 8, was
    dropped as stale (staleness 2 > 1), its documents never trained."""
    config = tiny_config(tmp_path, "service.max_staleness=1", "service.batches_in_flight=2", "train.steps=1000")
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, config.service.namespace, resume=False,
                                progress=False)
    published = []

    def publish() -> None:
        published.append(orchestrator.published)
        orchestrator.published += 1

    monkeypatch.setattr(orchestrator, "_publish_next", publish)
    try:
        orchestrator.published = 6
        write_progress(orchestrator.broker, LearnerProgress(step=6, finished=6, unbroken=6, weight_version=6))
        orchestrator._feed()
        assert published == [6, 7]  # both rolled out with version >= 6
        # docs-6 trained: step 7, version 7 out; docs-7 (version 6) unfinished could be trained at step 8 at the
        # latest if nothing more goes out: staleness 1.
        write_progress(orchestrator.broker, LearnerProgress(step=7, finished=7, unbroken=7, weight_version=7))
        orchestrator._feed()
        assert published == [6, 7]
        write_progress(orchestrator.broker, LearnerProgress(step=8, finished=8, unbroken=8, weight_version=8))
        orchestrator._feed()
        assert published == [6, 7, 8, 9]
        assert orchestrator.publish_versions == {8: 8, 9: 8}  # the finished ones are forgotten
    finally:
        orchestrator.client.close()


def test_a_redis_that_comes_back_empty_ends_the_run_naming_it(redis_url: str, tmp_path: Path) -> None:
    """Restarted without persistence, Redis lost the streams, the batches in flight and the weights: the run hung, or
    dropped every batch as stale, for ever."""
    config = tiny_config(tmp_path)
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, config.service.namespace, resume=False,
                                progress=False)
    try:
        orchestrator._check_redis_kept_the_run()  # nothing published yet: nothing to lose
        orchestrator.published = 3
        write_published(orchestrator.broker, 3)
        orchestrator._check_redis_kept_the_run()
        orchestrator.broker.delete_namespace()  # what a restart without persistence leaves: nothing
        with pytest.raises(ServiceError, match=r"^Redis at redis://\S+ lost this run's state \(its streams and records "
                                               r"are gone, or its last writes: .*\); the run stopped$"):
            orchestrator._check_redis_kept_the_run()
        # The next publish checks too: it wrote a new count, and every later check passed (batches skipped, exit 0).
        orchestrator.unpublished = DocumentBatch(batch_id="docs-3", doc_ids=["d"], token_ids=torch.zeros(1, 8,
                                                 dtype=torch.long), lengths=torch.tensor([8]),
                                                 cursor=DataCursor(epoch=0, offset=4))
        with pytest.raises(ServiceError, match="lost this run's state"):
            orchestrator._publish_next()
        assert read_published(orchestrator.broker) is None and orchestrator.broker.length(DOCUMENTS) == 0
    finally:
        orchestrator.client.close()


def test_a_report_read_on_a_redis_that_came_back_empty_ends_the_run_naming_it(redis_url: str, tmp_path: Path) -> None:
    """The driver's read of the learner's reports made their stream again on a Redis that lost it (restarted without
    persistence): it names the lost state instead, as the check of the published batches does."""
    config = tiny_config(tmp_path)
    namespace = config.service.namespace
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, namespace, resume=False, progress=False)
    try:
        orchestrator._fresh_streams()
        assert orchestrator._drain_reports(block_ms=None) == 0
        Broker(connect(redis_url), namespace).delete_namespace()  # what a restart without persistence leaves: nothing
        with pytest.raises(ServiceError, match=rf"^Redis at redis://\S+ lost this run's state \(stream '{namespace}:"
                                               rf"stream:{LEARNER_REPORTS}' \(read by consumer group 'orchestrator'\) "
                                               rf"no longer exists: its streams and records are gone, .*\); the run "
                                               rf"stopped$"):
            orchestrator._drain_reports(block_ms=None)
        assert list(orchestrator.client.scan_iter(match=f"{namespace}:*")) == []
    finally:
        orchestrator.client.close()


def test_a_role_that_ends_on_the_runs_lost_state_ends_the_run_naming_it(ray_session, redis_url: str,
                                                                         tmp_path: Path) -> None:
    """A rollout worker or reward replica whose stream is gone (Redis restarted without persistence) ends its loop on
    it: a replacement would find it gone too, so the run ends with the lost state, restarting nothing."""
    config = tiny_config(tmp_path)
    namespace = config.service.namespace
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, namespace, resume=False, progress=False)
    gone = RedisStateLost(f"stream '{namespace}:stream:{DOCUMENTS}' (read by consumer group 'rollout') no longer "
                          f"exists")
    future = ray.remote(num_cpus=0)(lambda: (_ for _ in ()).throw(gone)).remote()  # a worker's run that raised it
    ray.wait([future])
    orchestrator.members = [SimpleNamespace(role="rollout_worker", member_id="rollout_worker-0.0", seen_alive=True,
                                            future=future)]
    try:
        with pytest.raises(ServiceError, match=rf"^Redis at redis://\S+ lost this run's state \(stream '{namespace}:"
                                               rf"stream:{DOCUMENTS}' \(read by consumer group 'rollout'\) no longer "
                                               rf"exists: its streams and records are gone"):
            orchestrator._supervise()
        assert orchestrator.restarts == {}
    finally:
        orchestrator.client.close()


def test_a_learner_failure_names_the_data_parallel_rank_that_failed(ray_session, redis_url: str,
                                                                     tmp_path: Path) -> None:
    """Rank 0's own error, when another rank dies, is the connection it lost ("gloo ... Connection reset by
    peer"): the failed rank is named beside it."""
    import ray

    config = tiny_config(tmp_path)
    orchestrator = Orchestrator(config, run_tokenizer(config), redis_url, config.service.namespace, resume=False,
                                progress=False)
    try:
        assert orchestrator._failed_ranks() == ""  # no other ranks
        orchestrator.replica_futures = [ray.remote(num_cpus=0)(lambda: "{}").remote(),
                                        ray.remote(num_cpus=0, max_retries=0)(lambda: 1 / 0).remote()]
        assert orchestrator._failed_ranks(wait_s=60) == "learner rank 2 failed: ZeroDivisionError: division by zero"
    finally:
        orchestrator.client.close()


def _checkpoint_with_reports(run_dir: Path, reports: list[StepReport], step: int) -> Path:
    checkpoint = run_dir / "checkpoints" / "latest"
    checkpoint.mkdir(parents=True)
    (checkpoint / "learner_state.json").write_text(LearnerState(step=step, reports=len(reports)).model_dump_json())
    (checkpoint / "reports.jsonl").write_text("".join(report.model_dump_json() + "\n" for report in reports))
    return checkpoint


def test_reports_the_driver_missed_are_restored_from_the_checkpoint(tmp_path: Path) -> None:
    """The learner checkpointed steps 2 and 3 (and a drop between them); the driver died after writing
    step 2's row only: the resume writes the others, once."""
    reports = [StepReport(kind="step", step=2, seq=3, stats={"step": 2, "loss": 2.0}),
               StepReport(kind="dropped", step=2, seq=4, stats={"event": "dropped", "reason": "stale"}),
               StepReport(kind="step", step=3, seq=5, stats={"step": 3, "loss": 1.5})]
    checkpoint = _checkpoint_with_reports(tmp_path, reports, step=3)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    (tmp_path / "events.jsonl").write_text("")
    for restored in (2, 0):  # a second resume finds nothing missing
        assert restore_reports(checkpoint, tmp_path, TrainConfig(steps=3)) == restored
    assert step_rows(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5}]
    (dropped,) = events(tmp_path)
    assert (dropped["event"], dropped["step"], dropped["report"], dropped["reason"]) == ("dropped", 2, 4, "stale")


def test_restored_reports_keep_train_log_every(tmp_path: Path) -> None:
    """A metrics.jsonl row every train.log_every steps and the last, in the service as in the local loop."""
    reports = [StepReport(kind="step", step=step, seq=step, stats={"step": step}) for step in range(1, 6)]
    checkpoint = _checkpoint_with_reports(tmp_path, reports, step=5)
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "events.jsonl").write_text("")
    assert restore_reports(checkpoint, tmp_path, TrainConfig(steps=5, log_every=2)) == 3
    assert [row["step"] for row in step_rows(tmp_path)] == [2, 4, 5]


def test_a_resume_with_nothing_to_train_starts_nothing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=3")
    run_dir = tmp_path / "run"
    _checkpoint_with_reports(run_dir, [StepReport(kind="step", step=3, seq=3, stats={"step": 3, "loss": 1.5})], 3)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    # It returns before Redis (unreachable here) or Ray is touched, with the row the last driver missed.
    assert run(config, resume=True, progress=False, redis_url=UNREACHABLE_REDIS) == {"step": 3, "loss": 1.5}
    assert [row["step"] for row in step_rows(run_dir)] == [1, 2, 3]


def test_a_resume_with_other_windows_than_the_cursor_counts_fails_before_anything_starts(tmp_path: Path) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": "a long document " * 40}) + "\n")
    run_dir = tmp_path / "run"
    _checkpoint_with_reports(run_dir, [], 1)
    (run_dir / "data_source.json").write_text(json.dumps(
        {"files": [["docs.jsonl", source.stat().st_size]], "windows": {"seq_len": 192, "max_windows": 4}}))
    config = tiny_config(tmp_path, f"data.source={source}", "data.max_windows=2")
    with pytest.raises(ValueError, match=r"this resume has data.max_windows=2 x data.seq_len=192: resume with "
                                         r"data.max_windows=4 x data.seq_len=192, or start a fresh run"):
        run(config, resume=True, progress=False, redis_url=UNREACHABLE_REDIS)
    assert not (run_dir / "config.yaml").exists()


def test_a_missing_data_source_fails_before_anything_starts(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data.jsonl"
    config = tiny_config(tmp_path, f"data.source={missing}")
    with pytest.raises(ConfigError, match=rf"data.source='{missing}': data path .* does not exist"):
        run(config, progress=False, redis_url=UNREACHABLE_REDIS)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("rows, problem", [
    ([{"text": "too short for data.min_length=96"}] * 3, r"no document of '.*short.jsonl' passed the filters "
                                                          r"\(min_length=96\)"),
    ([{"text": 5}, {"text": "a long document " * 20}], r".*short.jsonl, line 1: column 'text' must hold text, got int: 5"),
])
@pytest.mark.parametrize("resume", [False, True])
def test_a_source_that_yields_no_first_batch_fails_before_the_run_directory_is_touched(
        tmp_path: Path, rows: list[dict], problem: str, resume: bool) -> None:
    """The file opened, but its documents are all dropped, or its first row is bad: found only once the learner had
    started, and the earlier run's checkpoint and metrics.jsonl replaced by a step-0 run's. Now it fails as the
    local loop does (naming data.source), reading the first batch before Ray and Redis start."""
    source = tmp_path / "short.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_dir = tmp_path / "run"
    checkpoint = _checkpoint_with_reports(run_dir, [], step=2)  # the earlier run's
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    (run_dir / "config.yaml").write_text("earlier: run\n")
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    config = tiny_config(tmp_path, f"data.source={source}")
    with pytest.raises(DataSourceError, match=rf"^data.source='{source}': {problem}"):
        run(config, resume=resume, progress=False, redis_url=UNREACHABLE_REDIS)
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    assert checkpoint.is_dir()


def test_rollout_batches_too_large_for_a_message_fail_before_anything_starts(tmp_path: Path) -> None:
    """Found only after every worker had rolled out a batch (minutes at this size) and dead-lettered it."""
    config = tiny_config(tmp_path, "model.hidden_size=2048", "model.num_heads=4", "train.batch_size=64",
                         "refine.num_chunks=8", "refine.num_samples=8")
    with pytest.raises(ValueError, match=r"a rollout batch would not fit one message: train.batch_size=64 x "
                                         r"refine.num_chunks=8 x refine.num_samples=8 = 4096 rollouts .* "
                                         r"model.hidden_size=2048 \(float32\) take 335544320 bytes, over the "
                                         r"codec's max_message_bytes=268435456"):
        run(config, progress=False, redis_url=UNREACHABLE_REDIS)
    assert not (tmp_path / "run" / "config.yaml").exists()
    run_config = tiny_config(tmp_path, "model.hidden_size=2048", "model.num_heads=4", "train.batch_size=64",
                             "refine.num_chunks=8", "refine.num_samples=8", "service.mode=colocated")
    check_rollout_message_size(run_config)  # colocated: rollouts never travel as messages


def test_a_killed_workers_staged_vllm_checkpoints_are_removed_and_no_one_elses(tmp_path: Path) -> None:
    """Workers of a run share rollout.vllm.weights_dir, each staging checkpoints in a folder of its own; a worker
    the run killed (restart, shutdown) could not remove its folder, so the run does."""
    weights = tmp_path / "weights"
    config = tiny_config(tmp_path, "model.num_heads=1", "rollout.engine=vllm", f"rollout.vllm.weights_dir={weights}")
    owners = {"killed": engine_owner("run-a", "rollout_worker-0.0"),
              "alive": engine_owner("run-a", "rollout_worker-0.1"),
              "other run": engine_owner("run-b", "rollout_worker-0.0"),
              "longer id": engine_owner("run-a", "rollout_worker-0.01")}
    weights.mkdir()
    folders = {who: Path(tempfile.mkdtemp(prefix=staging_prefix(owner), dir=weights)) for who, owner in owners.items()}
    (folders["killed"] / "v3").mkdir()
    (folders["killed"] / "v3" / "model.safetensors").write_bytes(b"weights")

    remove_member_files(config, "run-a", "rollout_worker", "rollout_worker-0.0")
    assert not folders["killed"].exists()
    assert all(folders[who].is_dir() for who in ("alive", "other run", "longer id"))
    # The learner and reward replicas stage nothing; nor does a worker on the snapshot engine.
    remove_member_files(config, "run-a", "reward", "rollout_worker-0.1")
    snapshot = tiny_config(tmp_path, f"rollout.vllm.weights_dir={weights}")
    remove_member_files(snapshot, "run-a", "rollout_worker", "rollout_worker-0.1")
    assert folders["alive"].is_dir()


def _epochs_and_offsets(config, batches: int, document_cursors: bool) -> list[tuple[int, int]]:
    position = DataPosition(epoch=0, cursor=-1)
    stream = document_batches(config, load_tokenizer(config.tokenizer))
    cursors = []
    for batch in itertools.islice(stream, batches):
        cursors.append((position.advance(batch.cursor, batch.cursors if document_cursors else ()), batch.cursor))
    return cursors


def test_data_position_counts_every_pass_a_batch_larger_than_the_source_starts(tmp_path: Path) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"doc{i}" + "x" * 40}) + "\n" for i in range(3)))
    config = load_config(None, [f"data.source={source}", "data.seq_len=64", "data.min_length=8", "train.mode=ntp",
                                "train.batch_size=4"])
    # Documents 1-4 end in pass 1 (0-based), 5-8 in pass 2, 9-12 in pass 3, 13-16 in pass 5.
    positions = _epochs_and_offsets(config, 4, document_cursors=True)
    assert positions == [(1, 1), (2, 2), (3, 3), (5, 1)]
    assert len(set(positions)) == len(positions)  # each batch its own rollout seed


@pytest.mark.parametrize("source, batch_size", [("file", 2), ("file", 4), ("synthetic", 2), ("synthetic", 4)])
def test_data_positions_of_batches_smaller_than_a_pass_are_as_before(tmp_path: Path, source: str,
                                                                     batch_size: int) -> None:
    """They seed the rollouts: counting passes per document must not change a usual run's seeds."""
    overrides = ["data.seq_len=192", "data.min_length=16", "train.mode=ntp", f"train.batch_size={batch_size}"]
    if source == "file":
        path = tmp_path / "docs.jsonl"  # 7 records, 5 of them documents
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["a" * 40, "b", "c" * 40, "d" * 40,
                                                                                 "e", "f" * 40, "g" * 40]))
        overrides.append(f"data.source={path}")
    else:
        overrides.append("data.num_documents=5")
    config = load_config(None, overrides)
    assert _epochs_and_offsets(config, 12, document_cursors=True) == _epochs_and_offsets(config, 12, False)
    if (source, batch_size) == ("file", 2):
        assert _epochs_and_offsets(config, 6, document_cursors=True) == [(0, 3), (0, 6), (1, 1), (1, 4), (1, 7),
                                                                          (2, 3)]
