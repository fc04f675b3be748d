"""The learner keeps in its checkpoints the reports the orchestrator has not confirmed writing, a skipped step's
included, and exports its metrics (real Redis)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
import torch

from learner.checkpoint import latest_checkpoint, read_checkpoint_reports, read_learner_state
from learner.learner import Learner
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import score_rollouts
from refine.config import RunConfig, load_config
from refine.loop import NONFINITE_KEY
import services.role
from services.messages import DataCursor, DocumentBatch, ScoredBatch
from services.progress import StepReport, write_recorded
from services.metrics import serve_metrics
from services.redis_server import EmbeddedRedis
from services.report_files import restore_reports
from services.resilience import RedisOutage
from services.streams import DOCUMENTS, SCORED, document_batch_id_for, make_run_streams, rollout_batch_id_for

SERVICE_TINY = Path(__file__).resolve().parents[2] / "configs" / "service_tiny.yaml"


def _documents(index: int) -> DocumentBatch:
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(index))
    return DocumentBatch(batch_id=document_batch_id_for(index), doc_ids=[f"d{index}.0", f"d{index}.1"], token_ids=ids,
                         lengths=torch.full((2,), 96), cursor=DataCursor(epoch=0, offset=2 * (index + 1)))


def test_checkpoint_keeps_the_reports_the_orchestrator_has_not_written(redis_url: str, tmp_path: Path) -> None:
    config = load_config(SERVICE_TINY, [f"train.out_dir={tmp_path / 'run'}", "service.mode=colocated",
                                        f"service.metrics_discovery_dir={tmp_path / 'prometheus'}",
                                        f"service.namespace=test-{uuid.uuid4().hex[:10]}", "train.checkpoint_every=0"])
    learner = Learner(config.model_dump_json(), redis_url, config.service.namespace)
    try:
        make_run_streams(learner.broker, colocated=True)  # as the driver does
        for index in range(3):
            learner.broker.publish(DOCUMENTS, _documents(index))
            assert learner.run_once(block_ms=100) == 1
        write_recorded(learner.broker, 1)  # the orchestrator wrote the first report, then died
        learner.checkpoint()
        checkpoint = latest_checkpoint(learner.out_dir)
        kept = read_checkpoint_reports(checkpoint)
        assert [(report.seq, report.kind, report.step) for report in kept] == [(2, "step", 2), (3, "step", 3)]
        assert kept[-1].stats["loss"] == learner.last_stats["loss"]
        assert read_learner_state(checkpoint).reports == 3  # a resumed learner numbers on from 4
    finally:
        learner.runtime.close()
        learner.broker.delete_namespace()


def _config(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_config(SERVICE_TINY, [f"train.out_dir={tmp_path / 'run'}", f"service.namespace=test-{uuid.uuid4().hex[:10]}",
                                      f"service.metrics_discovery_dir={tmp_path / 'prometheus'}", *overrides])


def _scored(learner: Learner, documents: DocumentBatch) -> ScoredBatch:
    """The batch a rollout worker and reward replica would make of `documents` with the learner's weights."""
    cfg = learner.config.refine
    rollouts = snapshot_rollouts(learner.model, documents.token_ids, documents.lengths, cfg,
                                 torch.Generator().manual_seed(0))
    return ScoredBatch(rollout_batch_id=rollout_batch_id_for(documents.batch_id),
                       document_batch_id=documents.batch_id, policy_version=0, worker_id="w0",
                       num_samples=rollouts.num_samples, rollout_len=rollouts.rollout_len,
                       positions=rollouts.positions, entropies=rollouts.entropies, rollout_tokens=rollouts.tokens,
                       behaviour_logprobs=rollouts.logprobs, rewards=score_rollouts(rollouts, cfg),
                       reward_type=cfg.reward)


def test_a_checkpointed_skipped_step_resumes_with_the_stats_it_reported(redis_url: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # lambda_ntp=1e300 makes the loss infinite: the step is skipped, and checkpointed with its report.
    config = _config(tmp_path, "train.checkpoint_every=1", "refine.lambda_ntp=1e300")
    learner = Learner(config.model_dump_json(), redis_url, config.service.namespace)
    try:
        learner.setup()
        make_run_streams(learner.broker, colocated=False)  # as the driver does
        documents = _documents(0)
        learner.documents.put(documents)
        learner.broker.publish(SCORED, _scored(learner, documents))
        assert learner.run_once(block_ms=100) == 1
        assert (learner.state.step, learner.state.skipped_steps) == (1, 1)

        [report] = read_checkpoint_reports(latest_checkpoint(learner.out_dir))  # what `refine train --resume` reads
        assert report.stats == learner.last_stats
        assert report.stats["skipped_nonfinite"] == 1.0 and report.stats["skipped_steps"] == 1
        assert "loss" not in report.stats and "loss" in report.stats[NONFINITE_KEY].split(",")
        assert all(math.isfinite(value) for value in report.stats.values() if isinstance(value, float))
        assert learner.metrics.registry.get_sample_value("refine_skipped_steps_total") == 1.0  # Prometheus: the skip

        # The orchestrator of the resumed run writes the report into metrics.jsonl, as strict JSON.
        (tmp_path / "metrics.jsonl").write_text("")
        (tmp_path / "events.jsonl").write_text("")
        assert restore_reports(latest_checkpoint(learner.out_dir), tmp_path, RunConfig().train) == 1
        row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=_refuse)
        assert row["step"] == 1 and "loss" not in row
    finally:
        learner.runtime.close()
    # The resumed learner's counters continue the run's totals: the dashboard's "Skipped steps" does not drop to 0.
    state_file = latest_checkpoint(learner.out_dir) / "learner_state.json"
    state = json.loads(state_file.read_text())
    # As if two batches had come too stale and two more steps had been skipped (3 skipped in 1 step, so that neither
    # counter could pass by reading the other or the step).
    state_file.write_text(json.dumps(state | {"dropped_stale": 2, "skipped_steps": 3}))
    # What the endpoint shows from its first scrape: a counter seen at 0 and then at 3 is 3 new skips to Prometheus'
    # increase(), and would fire the skipped-steps alert on every resume.
    first_served = []

    def serve_and_record(metrics, **kwargs):
        first_served.append({name: metrics.registry.get_sample_value(name) for name in (
            "refine_skipped_steps_total", "refine_stale_rollouts_dropped_total", "refine_learner_step")})
        return serve_metrics(metrics, **kwargs)

    monkeypatch.setattr(services.role, "serve_metrics", serve_and_record)
    resumed = Learner(config.model_dump_json(), redis_url, config.service.namespace, resume=True)
    try:
        assert first_served == [{"refine_skipped_steps_total": 3.0, "refine_stale_rollouts_dropped_total": 2.0,
                                 "refine_learner_step": 1.0}]
        assert resumed.runtime.endpoint is not None
        assert resumed.state.skipped_steps == 3
        assert resumed.metrics.registry.get_sample_value("refine_skipped_steps_total") == 3.0
        assert resumed.metrics.registry.get_sample_value("refine_stale_rollouts_dropped_total") == 2.0
    finally:
        resumed.runtime.close()
        resumed.broker.delete_namespace()


def _refuse(constant: str) -> float:
    raise AssertionError(f"metrics.jsonl holds {constant}, which JSON does not have")


def test_reports_an_earlier_learner_wrote_with_null_stats_are_read_without_them(tmp_path: Path) -> None:
    report = StepReport(kind="step", step=3, seq=3, stats={"step": 3, "skipped_nonfinite": 1.0, "loss": math.inf})
    line = report.model_dump_json()
    assert '"loss":null' in line  # how pydantic writes inf: StepReport refuses it when read back
    (tmp_path / "reports.jsonl").write_text(line + "\n")
    [read] = read_checkpoint_reports(tmp_path)
    assert read.stats == {"step": 3, "skipped_nonfinite": 1.0} and read.seq == 3


def test_a_colocated_learner_exports_its_rollouts_their_reward_and_entropy(redis_url: str, tmp_path: Path) -> None:
    # No rollout workers or reward replicas run in this mode: nobody else sets these gauges.
    config = _config(tmp_path, "service.mode=colocated", "train.checkpoint_every=0")
    learner = Learner(config.model_dump_json(), redis_url, config.service.namespace)
    try:
        make_run_streams(learner.broker, colocated=True)  # as the driver does
        learner.broker.publish(DOCUMENTS, _documents(0))
        assert learner.run_once(block_ms=100) == 1
        registry, stats = learner.metrics.registry, learner.last_stats
        labels = {"reward_type": "cosine"}
        assert registry.get_sample_value("refine_reward_mean", labels) == stats["reward_mean"]
        assert registry.get_sample_value("refine_reward_std", labels) == stats["reward_std"]
        assert registry.get_sample_value("refine_selected_entropy") == stats["entropy_selected"]
        refine = config.refine  # the dashboard's rollouts/s and rollout tokens/s
        rollouts = len(_documents(0).lengths) * refine.num_chunks * refine.num_samples
        assert registry.get_sample_value("refine_rollouts_total") == rollouts
        assert registry.get_sample_value("refine_rollout_tokens_total") == rollouts * refine.rollout_len
        # No rollout worker reads published weights here: the learner publishes none (for a 1.3B model, seconds
        # per step and gigabytes of Redis), but its weight version still follows its steps.
        assert learner.weights.latest_version() is None
        assert registry.get_sample_value("refine_weight_version") == learner.state.weight_version == 1
    finally:
        learner.runtime.close()
        learner.broker.delete_namespace()


def test_a_damaged_local_checkpoint_is_one_error_naming_its_file(tmp_path):
    """A service --resume over a `refine train --local` checkpoint reads its trainer.pt: garbage there is the
    same one-line refusal the local loop gives, not torch's traceback advising an unsafe load."""
    (tmp_path / "trainer.pt").write_text("garbage")
    with pytest.raises(ValueError, match="trainer.pt: not a readable training checkpoint") as error:
        read_learner_state(tmp_path)
    assert "weights_only" not in str(error.value)


def test_a_learner_whose_redis_is_gone_for_good_checkpoints_the_steps_it_trained(tmp_path: Path) -> None:
    """Redis stays away past the outage tolerance: the run ends, but the steps trained since the last checkpoint
    (and their reports, which the orchestrator could not write) are saved on the way out, for --resume."""
    server, learner = _colocated_learner_on_its_own_redis(tmp_path)
    try:
        for index in range(3):
            learner.broker.publish(DOCUMENTS, _documents(index))
            assert learner.run_once(block_ms=100) == 1
        server.stop()
        learner.outage_timeout_s = 1.0  # the run's tolerance is at least a minute
        with pytest.raises(RedisOutage):
            learner.run(block_ms=100)
        checkpoint = latest_checkpoint(learner.out_dir)
        assert read_learner_state(checkpoint).step == 3
        assert [report.step for report in read_checkpoint_reports(checkpoint)] == [1, 2, 3]
    finally:
        learner.runtime.close()
        server.stop()


def test_redis_lost_while_a_step_is_acknowledged_checkpoints_that_step_with_its_report_and_cursor(tmp_path: Path) -> None:
    """Redis went away between a step's update and its report: the checkpoint on the way out held the step's
    weights and count, but the previous cursor and no report, so --resume had no row for it and trained its batch
    again (seen with Redis stopped for 75 s under a live run)."""
    server, learner = _colocated_learner_on_its_own_redis(tmp_path)
    try:
        for index in range(2):
            learner.broker.publish(DOCUMENTS, _documents(index))
            assert learner.run_once(block_ms=100) == 1
        learner.broker.publish(DOCUMENTS, _documents(2))
        acknowledge = learner.broker.ack_consumed

        def redis_gone_at_the_acknowledgement(*args, **kwargs):
            server.stop()
            return acknowledge(*args, **kwargs)

        learner.broker.ack_consumed = redis_gone_at_the_acknowledgement
        learner.outage_timeout_s = 1.0  # the run's tolerance is at least a minute
        with pytest.raises(RedisOutage):
            learner.run(block_ms=100)
        checkpoint = latest_checkpoint(learner.out_dir)
        state = read_learner_state(checkpoint)
        assert (state.step, state.cursor) == (3, _documents(2).cursor.offset)
        assert [report.step for report in read_checkpoint_reports(checkpoint)] == [1, 2, 3]
    finally:
        learner.runtime.close()
        server.stop()


def _colocated_learner_on_its_own_redis(tmp_path: Path) -> tuple[EmbeddedRedis, Learner]:
    """A colocated learner reading documents, on a Redis server of the test's own (the test stops it halfway)."""
    server = EmbeddedRedis().start()
    config = load_config(SERVICE_TINY, [f"train.out_dir={tmp_path / 'run'}", "service.mode=colocated",
                                        f"service.metrics_discovery_dir={tmp_path / 'prometheus'}",
                                        f"service.namespace=test-{uuid.uuid4().hex[:10]}", "train.checkpoint_every=0",
                                        "train.steps=10"])
    learner = Learner(config.model_dump_json(), server.url, config.service.namespace)
    make_run_streams(learner.broker, colocated=True)  # as the driver does
    return server, learner
