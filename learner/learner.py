"""The learner role: trains on scored rollout batches (or, colocated, on document batches directly).

For each batch:
- exactly once: a rollout batch id already trained (or dropped) is acknowledged and skipped; after
  the optimizer step the id is recorded and the stream entry acknowledged in one transaction;
- staleness: `learner step - policy version` of the rollouts; over `service.max_staleness` the batch
  is dropped (acknowledged, its id recorded, counted, reported to events.jsonl);
- fit: a scored batch that does not fit its documents (another batch size, a rollout position outside
  1..length - k, a token id past the vocabulary) is dropped the same way, with the reason;
- foreign: a batch this run did not produce (of a document batch id the orchestrator never published: not
  `docs-<index>`, or past the count it has issued; unlike the run: another reward, number of samples, rollout
  length or of positions per document; a ground truth that is not its documents' tokens) is acknowledged and
  reported, never trained, not recorded and not counted as finished, its documents kept: the orchestrator
  paces itself by `published - finished`, a foreign batch counted would let it run one batch further ahead for
  good, and the run's own rollouts of those documents are still to come. Colocated, a document batch the model
  cannot read (`unusable_documents`) is dead-lettered, as a rollout worker does;
- update: the documents behind the rollouts come from the document store (services/streams.py);
  GRPO advantages + one-pass loss + clipped AdamW step, skipped when not finite;
- weights: the policy version is the number of learner steps taken (rollout batches trained, each
  `train.mini_batches` optimizer steps; a step skipped as not finite counts too); every
  `sync_interval` steps the weights are published under that version (version = step, so staleness
  is step arithmetic and `service.max_staleness` counts rollout batches);
- checkpoints every `train.checkpoint_every` steps and when the run ends or is stopped: model,
  optimizer, RNG, data cursor and weight version, enough for an exact resume, and the reports the
  orchestrator has not confirmed writing yet (a step's report goes out after its checkpoint: if the
  driver dies before writing it, the resume finds it in the checkpoint). Batches can finish out
  of order (several in flight, several workers), so the checkpoint's data cursor is that of the last
  batch of the unbroken run of finished ones (`ResumePoint`): a resume never skips an untrained
  batch (it may train again one that finished past a gap).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from learner.data_parallel import DataParallelGroup, free_address, learner_device, weights_digest
from learner.checkpoint import LearnerState, latest_checkpoint, load_learner_checkpoint, save_learner_checkpoint
from learner.update import LEARNER_PHASES, fused_update, onepass_update, rollouts_from_batch
from refine.algorithm.rewards import check_run_reward
from refine.algorithm.rollout import positions_problem
from refine.config import RunConfig, run_tokenizer
from refine.evaluation.heldout import heldout_evaluator
from refine.loop import finite_stats, prepare_model
from refine.optim import learning_rate, set_learning_rate
from refine.step import StepResult, make_optimizer
from services.messages import DataCursor, DocumentBatch, ScoredBatch
from services.metrics import COLOCATED_LEARNER_FAMILIES, ROLE_FAMILIES
from services.namespace_claim import key_ttl_s
from services.progress import (
    LearnerProgress, StepReport, read_progress, read_published, read_recorded, write_progress,
)
from services.resilience import (
    TRANSIENT, OutageTolerance, RedisOutage, RedisStateLost, outage_timeout_s, retry_redis,
)
from services.role import RoleRuntime
from services.source_digest import check_sources
from services.streams import (
    CONSUMED_KEY, DOCUMENTS, DROPPED_KEY, LEARNER_GROUP, LEARNER_REPORTS, SCORED, DocumentStore, document_batch_id_for,
    document_batch_index, rollout_batch_id_for, unusable_documents,
)
from services.weight_store import RedisWeightStore, WeightVersionError

__all__ = ["MEMBER_ID", "ROLE", "Learner", "ResumePoint", "ground_truth_mismatch", "misfit", "unlike_run"]

ROLE = "learner"
MEMBER_ID = "learner-0"  # rank 0's member id: heartbeats, metrics discovery
# Unconfirmed reports kept in memory before the learner asks the orchestrator what it wrote (besides at
# every checkpoint): bounds their memory in a long run with train.checkpoint_every=0.
UNRECORDED_CHECK_EVERY = 256

logger = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    """Where a resumed run continues reading data: after the last batch of the unbroken run of
    finished (trained or dropped) batches, in publish order, since this run started.

    A cursor past a batch that has not finished yet would skip it on resume: with several batches in
    flight, docs-1 may be trained before docs-0. Batches finished past such a gap wait in `ahead`
    until the gap closes (at most `service.batches_in_flight` of them)."""

    epoch: int
    cursor: int
    next_index: int = 0  # publish index of the first batch not finished yet
    ahead: dict[int, DataCursor | None] = field(default_factory=dict)

    def finished(self, index: int, cursor: DataCursor | None) -> None:
        """Batch `index` (0 = the run's first) was trained or dropped; `cursor` is None when its
        documents are unknown (then the cursor moves on with the next batch)."""
        if index < self.next_index:
            return  # counted already
        self.ahead[index] = cursor
        while self.next_index in self.ahead:
            done = self.ahead.pop(self.next_index)
            if done is not None:
                self.epoch, self.cursor = done.epoch, done.offset
            self.next_index += 1


def unlike_run(batch: ScoredBatch, config: RunConfig) -> str | None:
    """Why `batch` is not what this run's roles make (naming the field, its value and the setting), or None: the
    reward it was scored with, and the n samples of k tokens at c positions per document that size its advantage
    groups and its loss."""
    refine = config.refine
    if batch.reward_type != refine.reward:
        return f"reward_type: {batch.reward_type!r}, but the run scores with refine.reward={refine.reward!r}"
    if batch.num_samples != refine.num_samples:
        return (f"num_samples: {batch.num_samples}, but the run samples refine.num_samples={refine.num_samples} "
                f"per position")
    if batch.rollout_len != refine.rollout_len:
        return (f"rollout_len: {batch.rollout_len}, but the run's rollouts have "
                f"refine.rollout_len={refine.rollout_len} tokens")
    if batch.num_chunks != refine.num_chunks:
        return f"positions: {batch.num_chunks} per document, but the run takes refine.num_chunks={refine.num_chunks}"
    return None


def misfit(batch: ScoredBatch, documents: DocumentBatch, vocab_size: int) -> str | None:
    """Why `batch` cannot be trained on `documents` (naming the field and value), or None if it fits:
    one row of positions per document, every position p in 1..length - k (a prefix of at least one
    token, and k document tokens after it to compare against), token ids inside the vocabulary (the
    documents' too: they come from Redis as well)."""
    if batch.batch_size != documents.batch_size:
        return (f"positions: {batch.batch_size} rows, but document batch {documents.batch_id!r} has "
                f"{documents.batch_size} documents")
    problem = documents.vocabulary_misfit(vocab_size)
    if problem is not None:
        return f"documents: {problem} (document batch {documents.batch_id!r})"
    problem = positions_problem(batch.positions, documents.lengths, batch.rollout_len)
    if problem is not None:
        return problem
    if batch.rollout_tokens.numel() and int(batch.rollout_tokens.max()) >= vocab_size:
        return f"rollout_tokens: token id {int(batch.rollout_tokens.max())} is not below model.vocab_size={vocab_size}"
    return None


def ground_truth_mismatch(batch: ScoredBatch, documents: DocumentBatch) -> str | None:
    """Why `batch` was not rolled out from `documents`, or None: its ground truth (what the reward compared the
    rollouts with) is not the documents' own tokens at its positions. Only for a batch that fits them (misfit)."""
    if batch.ground_truth_tokens is None:
        return None
    # Row r = (b * c + j) * n + s holds the k document tokens from positions[b, j] on.
    k, n, chunks = batch.rollout_len, batch.num_samples, batch.num_chunks
    docs = torch.arange(batch.num_rollouts) // (chunks * n)
    columns = batch.positions.reshape(-1).repeat_interleave(n)[:, None] + torch.arange(k)
    expected = documents.token_ids.to(torch.long)[docs[:, None], columns]
    wrong = expected != batch.ground_truth_tokens.to(torch.long)
    if not bool(wrong.any()):
        return None
    row, i = wrong.nonzero()[0].tolist()
    return (f"ground_truth_tokens[{row}, {i}]={int(batch.ground_truth_tokens[row, i])}, but document batch "
            f"{documents.batch_id!r} has {int(expected[row, i])} there (token_ids[{int(docs[row])}, "
            f"{int(columns[row, i])}])")


class Learner:
    """Learner rank 0 (a Ray actor in the service): with service.num_learners > 1 it leads ranks 1..R-1."""

    def __init__(self, config_json: str, redis_url: str, namespace: str, resume: bool = False,
                 member_id: str = MEMBER_ID, sources: str | None = None) -> None:
        """`sources`: the driver's SourceStamp (JSON); other sources here refuse the start (services/source_digest)."""
        check_sources(sources)  # first: another version of the code may not even read the config
        self.config = config = RunConfig.model_validate_json(config_json)
        if config.service.mode == "colocated":  # the fused step scores here: import refine.reward_modules
            check_run_reward(config.refine.reward, config.refine.reward_modules, decodes_text=False)
        config.train.device = learner_device(config.train.device)  # the GPU Ray gave this actor, if any
        self.member_id = member_id
        families = ROLE_FAMILIES[ROLE] | (COLOCATED_LEARNER_FAMILIES if config.service.mode == "colocated" else set())
        # Its metrics are served once a resumed run's totals are in them (at the end of __init__).
        self.runtime = RoleRuntime(ROLE, member_id, redis_url, namespace, config.service.metrics_discovery_dir,
                                   threads=config.train.threads or 1, serve_now=False, metric_families=families,
                                   key_ttl_s=key_ttl_s(config))
        self.broker = self.runtime.broker
        self.metrics = self.runtime.metrics
        self.weights = RedisWeightStore(self.runtime.client, namespace, key_ttl_s=key_ttl_s(config))
        self.documents = DocumentStore(self.broker)
        self.colocated = config.service.mode == "colocated"
        self.device = config.train.device
        self.out_dir = Path(config.train.out_dir)
        self.outage_timeout_s = outage_timeout_s(config.service.heartbeat_timeout_s)

        self.model = prepare_model(config)
        self.tokenizer = run_tokenizer(config)  # its files go into every checkpoint's model directory
        # Read here, where the learner runs (data.eval_source must be readable on its node, as train.out_dir is).
        # With data-parallel ranks each measures its share of the documents (learner/replica.py). The driver's
        # check_data_source already warned about them, once.
        self.evaluate = None if config.data.eval_source is None else heldout_evaluator(
            config, self.model, self.tokenizer, rank=0, world_size=config.service.num_learners,
            sum_over_ranks=self._sum_over_ranks, warn=False)
        self.optimizer = make_optimizer(self.model, config.optim)
        self.generator = torch.Generator(device=self.device).manual_seed(config.train.seed)
        self.ref_model = None
        if config.refine.kl_coef > 0:
            self.ref_model = prepare_model(config, training=False).requires_grad_(False)
        self.state = LearnerState()
        checkpoint = latest_checkpoint(self.out_dir)
        if resume and checkpoint.exists():
            self.state = load_learner_checkpoint(checkpoint, self.model, self.optimizer, self.generator)
            logger.info("resumed from %s at step %d", checkpoint, self.state.step)
            # The run's totals, not this process's: the dashboard shows them, and a resume is no reset to 0.
            self.metrics.skipped_steps.inc(self.state.skipped_steps)
            self.metrics.stale_dropped.inc(self.state.dropped_stale)
            self.metrics.learner_step.set(self.state.step)
            self.metrics.weight_version.set(self.state.weight_version)
        self.checkpointed_step = self.state.step if resume and checkpoint.exists() else -1
        self.resume_point = ResumePoint(epoch=self.state.epoch, cursor=self.state.cursor)
        self.finished = 0
        self.duplicates = 0
        # The progress record this learner last wrote to Redis, checked while it waits (check_redis_kept_our_writes).
        self.written_progress: LearnerProgress | None = None
        self.unrecorded: list[StepReport] = []  # reports the orchestrator has not confirmed writing
        self.last_stats: dict[str, float | int | str] = {}
        self.group: DataParallelGroup | None = None  # with service.num_learners > 1, this is rank 0
        self.runtime.serve_metrics()

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        return values if self.group is None else self.group.sum(values)

    # -- setup ----------------------------------------------------------------------------------

    def data_parallel_address(self) -> str:
        """Where ranks 1..R-1 meet this rank (service.num_learners > 1): a free port on its host."""
        return free_address()

    def setup(self, data_parallel_address: str | None = None) -> str:
        """Join the learners' process group (when given its address; ranks 1..R-1 must be joining
        too), publish the starting weights (version = step) and the progress record; returns JSON
        with the step, data cursor, weight version and report count the run continues from."""
        if data_parallel_address is not None:
            self.group = DataParallelGroup(data_parallel_address, 0, self.config.service.num_learners, self.device,
                                           timeout_s=max(300.0, 10 * self.config.service.heartbeat_timeout_s))
            self.group.broadcast_parameters(self.model, self.optimizer)
        latest = retry_redis(self.weights.latest_version, "read weight version", self.outage_timeout_s)
        if latest is not None and latest >= self.state.step:
            self.weights.clear()  # left over from an earlier run in this namespace
        self._publish_weights()
        self._write_progress()
        self.metrics.learner_step.set(self.state.step)
        return json.dumps({"step": self.state.step, "cursor": self.state.cursor, "epoch": self.state.epoch,
                           "weight_version": self.state.weight_version, "reports": self.state.reports})

    def _publish_weights(self) -> None:
        version = self.state.step
        if self.colocated:  # no rollout worker reads them: the fused step samples from these very weights
            self.state.weight_version = version
            self.metrics.weight_version.set(version)
            return
        started = time.perf_counter()
        state_dict = self.model.state_dict()

        def publish() -> None:
            try:
                self.weights.publish(state_dict, version)
            except WeightVersionError:
                if self.weights.latest_version() != version:  # not our own earlier, lost-reply attempt
                    raise

        retry_redis(publish, f"publish weights v{version}", self.outage_timeout_s)
        self.state.weight_version = version
        self.metrics.weight_version.set(version)
        self.metrics.step_seconds.labels(phase="weight_publish").observe(time.perf_counter() - started)

    def _write_progress(self, done: bool = False) -> None:
        progress = LearnerProgress(step=self.state.step, finished=self.finished, unbroken=self.resume_point.next_index,
                                   weight_version=self.state.weight_version, done=done)
        retry_redis(lambda: write_progress(self.broker, progress), "write progress", self.outage_timeout_s)
        self.written_progress = progress

    def _new_report(self, kind: str, stats: dict) -> StepReport:
        """The next report, numbered through the run and kept until the orchestrator confirms writing it."""
        self.state.reports += 1
        report = StepReport(kind=kind, step=self.state.step, seq=self.state.reports, stats=stats)
        self.unrecorded.append(report)
        if len(self.unrecorded) >= UNRECORDED_CHECK_EVERY:
            self._forget_recorded()
        return report

    def _send(self, report: StepReport) -> None:
        retry_redis(lambda: self.broker.publish(LEARNER_REPORTS, report), "report", self.outage_timeout_s)

    def _forget_recorded(self) -> None:
        """Drop the reports the orchestrator confirmed writing; keep them all while Redis is away."""
        try:
            recorded = read_recorded(self.broker)
        except TRANSIENT as exc:
            logger.warning("could not read which reports the orchestrator wrote: %s", exc)
            return
        self.unrecorded = [report for report in self.unrecorded if report.seq > recorded]

    # -- one batch ------------------------------------------------------------------------------

    def run_once(self, block_ms: int = 500) -> int:
        """Handle the batches one read returns; returns how many."""
        stream, message_type, handle = ((DOCUMENTS, DocumentBatch, self.handle_documents) if self.colocated
                                        else (SCORED, ScoredBatch, self.handle_scored))
        entries = self.broker.consume(stream, LEARNER_GROUP, self.member_id, message_type, count=1, block_ms=block_ms)
        if not entries:
            # An entry delivered while Redis went down (its reply lost) stays pending for us: take it back.
            entries = self.broker.reclaim(stream, LEARNER_GROUP, self.member_id, message_type,
                                          min_idle_ms=self.config.service.reclaim_idle_ms, count=1)
        if not entries:
            self.check_redis_kept_our_writes()
        for entry_id, batch in entries:
            handle(entry_id, batch)
        return len(entries)

    def check_redis_kept_our_writes(self) -> None:
        """While it waits, the learner checks that Redis still holds its last progress record and weights. A Redis
        killed before its append-only file had its last writes (appendfsync everysec) comes back without them, and
        the run would stall without an error: the orchestrator, reading an older record, publishes no more batches;
        or the workers roll out older weights, every batch of which is dropped as stale."""
        written = self.written_progress
        if written is None:  # before setup: nothing written yet
            return
        progress = read_progress(self.broker)
        if progress is None or progress.step < written.step or progress.finished < written.finished:
            found = "none" if progress is None else f"step {progress.step}, {progress.finished} batches finished"
            raise RedisStateLost(f"the learner's progress record is behind what it wrote (Redis holds {found}; "
                                 f"it wrote step {written.step}, {written.finished} batches finished)")
        if self.colocated:  # it publishes no weights
            return
        # The record names the last version published: each publish comes before the record that follows it.
        latest = self.weights.latest_version()
        if latest is None or latest < written.weight_version:
            raise RedisStateLost(f"weight version {written.weight_version}, the learner's last published, is gone "
                                 f"from Redis (its latest version: {latest})")

    def seen(self, message_id: str, document_batch_id: str) -> bool:
        """Whether the batch was trained or dropped already: below the unbroken run of finished batches
        (ResumePoint.next_index), else recorded in the consumed sets, which hold only the batches
        finished past a gap (the rest are dropped from them as the run closes up, see _batch_finished)."""
        index = document_batch_index(document_batch_id)
        if index is not None and index < self.resume_point.next_index:
            return True
        return (self.broker.already_consumed(CONSUMED_KEY, message_id)
                or self.broker.already_consumed(DROPPED_KEY, message_id))

    def handle_scored(self, entry_id: str, batch: ScoredBatch) -> None:
        rollout_id = batch.rollout_batch_id
        unpublished = self._never_published("document_batch_id", batch.document_batch_id)
        if unpublished is not None:
            self._ignore_foreign(SCORED, entry_id, rollout_id, unpublished, batch.worker_id)
            return
        if self.seen(rollout_id, batch.document_batch_id):
            self.broker.ack(SCORED, LEARNER_GROUP, [entry_id])
            self.duplicates += 1
            return
        staleness = self.state.step - batch.policy_version
        # Read whatever happens next: a dropped batch is finished too, and its cursor moves the resume point.
        documents = self.documents.get(batch.document_batch_id)
        problem = None if documents is None else misfit(batch, documents, self.config.model.vocab_size)
        # Not this run's rollouts of these documents (another run's, forged): dropping it would delete the documents
        # and count their batch finished, and the run's own rollouts of them would then be skipped as duplicates.
        foreign = unlike_run(batch, self.config) or (
            ground_truth_mismatch(batch, documents) if documents is not None and problem is None else None)
        if foreign is not None:
            self._ignore_foreign(SCORED, entry_id, rollout_id, f"{foreign}: not this run's rollouts of document "
                                                              f"batch {batch.document_batch_id!r}", batch.worker_id)
            return
        if documents is None:
            # Published (not foreign, above), not finished (not seen), and its documents are stored before it is
            # published: only a Redis that lost the run's state has none. Dropping it would count it finished and
            # skip its documents without a word.
            raise RedisStateLost(f"the documents of batch {batch.document_batch_id!r}, published and not yet trained, "
                                 f"are gone from Redis")
        if staleness >= 0:  # the run's own rollouts (a future version is dropped as such, and counted in events)
            self.metrics.staleness.observe(staleness)
        if staleness > self.config.service.max_staleness or staleness < 0:
            self._drop(entry_id, batch, staleness, "stale" if staleness > 0 else "future_version", documents)
            return
        if problem is not None:  # a worker or reward bug: training on it would crash or use wrong rows
            self._drop(entry_id, batch, staleness, "invalid", documents, problem)
            return
        started = time.perf_counter()
        lr = self._scheduled_learning_rate()
        if self.group is not None:
            self.group.send_batch(batch, documents)
            outcome = self.group.update(self.model, self.optimizer, batch, documents, self.config, self.ref_model)
        else:
            ids, lengths = self._tensors(documents)
            rollouts = rollouts_from_batch(batch, self.device)
            outcome = onepass_update(self.model, self.optimizer, ids, lengths, rollouts, self.config, self.ref_model)
        self._finish_step(SCORED, entry_id, rollout_id, documents, outcome, {
            "staleness": staleness, "policy_version": batch.policy_version, "rollout_batch_id": rollout_id,
            "worker_id": batch.worker_id, "reward_type": batch.reward_type, "lr": lr,
            "step_seconds": time.perf_counter() - started,  # the update; the rollouts ran in the workers
        })

    def handle_documents(self, entry_id: str, batch: DocumentBatch) -> None:
        """Colocated: the fused on-policy step on a document batch."""
        unpublished = self._never_published("batch_id", batch.batch_id)
        if unpublished is not None:
            self._ignore_foreign(DOCUMENTS, entry_id, batch.batch_id, unpublished, None)
            return
        if self.seen(batch.batch_id, batch.batch_id):
            self.broker.ack(DOCUMENTS, LEARNER_GROUP, [entry_id])
            self.duplicates += 1
            return
        problem = unusable_documents(batch, self.config)
        if problem is not None:  # as a rollout worker does: the orchestrator ends the run with the reason
            reason = f"learner {self.member_id} cannot train on document batch {batch.batch_id}: {problem}"
            logger.error("dead-lettering document batch %s (entry %s): %s", batch.batch_id, entry_id, reason)
            retry_redis(lambda: self.broker.dead_letter(DOCUMENTS, LEARNER_GROUP, entry_id, batch, reason),
                        "dead-letter documents", self.outage_timeout_s)
            return
        started = time.perf_counter()
        lr = self._scheduled_learning_rate()
        ids, lengths = self._tensors(batch)
        outcome = fused_update(self.model, self.optimizer, ids, lengths, self.config, self.generator, self.ref_model)
        self._finish_step(DOCUMENTS, entry_id, batch.batch_id, batch, outcome,
                          {"staleness": 0, "policy_version": self.state.step, "lr": lr,
                           "step_seconds": time.perf_counter() - started})

    def _scheduled_learning_rate(self) -> float:
        """Set the optimizer to the learning rate of the step about to be taken (optim.schedule); returns it.
        Data-parallel replicas set the same rate from their own step count (LearnerReplica.run)."""
        lr = learning_rate(self.config.optim, self.state.step + 1, self.config.train.steps)
        set_learning_rate(self.optimizer, lr)
        return lr

    def _tensors(self, batch: DocumentBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.token_ids.to(self.device, torch.long), batch.lengths.to(self.device, torch.long)

    def _drop(self, entry_id: str, batch: ScoredBatch, staleness: int, reason: str,
              documents: DocumentBatch, error: str = "") -> None:
        """Acknowledge and record a batch not trained on; `documents` give its cursor."""
        rollout_id = batch.rollout_batch_id
        retry_redis(lambda: self.broker.ack_consumed(SCORED, LEARNER_GROUP, [entry_id], DROPPED_KEY, [rollout_id]),
                    "ack dropped batch", self.outage_timeout_s)
        retry_redis(lambda: self.documents.delete(batch.document_batch_id), "delete documents", self.outage_timeout_s)
        self._forget_consumed(self._batch_finished(batch.document_batch_id, documents.cursor))
        self.state.dropped_stale += reason == "stale"
        self.metrics.stale_dropped.inc(reason == "stale")
        self.state.dropped_invalid += reason == "invalid"
        self.finished += 1
        if error:
            logger.warning("dropped rollout batch %s of %s (%s): %s", rollout_id, batch.worker_id, reason, error)
        else:
            logger.info("dropped rollout batch %s (%s, staleness %d)", rollout_id, reason, staleness)
        self._write_progress()
        stats = {"event": "dropped", "reason": reason, "rollout_batch_id": rollout_id,
                 "policy_version": batch.policy_version, "staleness": staleness,
                 "dropped_stale": self.state.dropped_stale, "dropped_invalid": self.state.dropped_invalid}
        if error:
            stats |= {"error": error, "worker_id": batch.worker_id}
        self._send(self._new_report("dropped", stats))

    def _never_published(self, field: str, document_batch_id: str) -> str | None:
        """Why the orchestrator never published document batch `document_batch_id` (`field` names where the id came
        from), or None: an id not of its form, or one past the count it has issued (when an orchestrator runs)."""
        index = document_batch_index(document_batch_id)
        if index is None:
            return (f"{field}: {document_batch_id!r} is not a document batch the orchestrator published "
                    f"(those are {document_batch_id_for(0)!r}, {document_batch_id_for(1)!r}, ...)")
        published = read_published(self.broker)
        if published is not None and index >= published:
            return (f"{field}: {document_batch_id!r} is past the {published} document batches the orchestrator has "
                    f"published")
        return None

    def _ignore_foreign(self, stream: str, entry_id: str, message_id: str, error: str, worker_id: str | None) -> None:
        """Acknowledge a batch this run did not produce (`error` says why: a document batch the orchestrator never
        published, another run's settings or documents): not trained, not recorded as consumed (the run's own
        batch of the same id is still to come), its documents kept, and not counted as finished, which would move
        the orchestrator's pacing (`published - finished`) one batch ahead for the rest of the run. Reported, for
        events.jsonl."""
        retry_redis(lambda: self.broker.ack(stream, LEARNER_GROUP, [entry_id]), "ack foreign batch",
                    self.outage_timeout_s)
        logger.warning("ignored %s entry %s (%s, from %s): %s", stream, entry_id, message_id, worker_id, error)
        stats = {"event": "dropped", "reason": "foreign", "message_id": message_id, "error": error}
        if worker_id is not None:
            stats["worker_id"] = worker_id
        self._send(self._new_report("dropped", stats))

    def _batch_finished(self, document_batch_id: str, cursor: DataCursor) -> list[str]:
        """Move the checkpoint's data cursor through the unbroken run of finished batches; returns the ids whose
        consumed records may go now (`_forget_consumed`)."""
        index = document_batch_index(document_batch_id)
        if index is None:
            return []  # not one of the run's data batches: no place in the data order
        before = self.resume_point.next_index
        self.resume_point.finished(index, cursor)
        self.state.epoch, self.state.cursor = self.resume_point.epoch, self.resume_point.cursor
        # Batches now below the watermark are recognized by their index (seen()): their records go, or
        # the consumed sets would grow by one id per step for the whole run.
        closed = [document_batch_id_for(i) for i in range(before, self.resume_point.next_index)]
        return closed + [rollout_batch_id_for(batch_id) for batch_id in closed]

    def _forget_consumed(self, ids: list[str]) -> None:
        if ids:
            retry_redis(lambda: self.broker.forget_consumed((CONSUMED_KEY, DROPPED_KEY), ids), "forget consumed",
                        self.outage_timeout_s)

    def _finish_step(self, stream: str, entry_id: str, message_id: str, documents: DocumentBatch,
                     outcome: StepResult, extra: dict) -> None:
        state = self.state
        # What a checkpoint holds of the step (its count, the data cursor, its report) is settled before any Redis
        # call: Redis lost in those calls checkpoints the step whole on the way out (run), never a step ahead of
        # its report and cursor (--resume then had no row for it and trained its batch again).
        state.step += 1
        state.skipped_steps += outcome.skipped
        cursor = documents.cursor
        forgettable = self._batch_finished(documents.batch_id, cursor)
        publishes = self.colocated or state.step % self.config.service.sync_interval == 0  # colocated: every step's
        self.finished += 1
        # One set of stats for Prometheus, the report (metrics.jsonl, the checkpoint) and the run's result.
        evaluated = self.evaluate is not None and self.config.train.evaluates_step(state.step)
        held_out = self.evaluate() if evaluated else {}
        stats = finite_stats(dict(outcome.stats) | extra | held_out | {
            "step": state.step, "weight_version": state.step if publishes else state.weight_version,
            "document_batch_id": documents.batch_id, "cursor": cursor.offset, "data_epoch": cursor.epoch,
            "tokens": int(documents.lengths.sum()), "skipped_steps": state.skipped_steps,
            "dropped_stale": state.dropped_stale, "dropped_invalid": state.dropped_invalid,
            "duplicates_skipped": self.duplicates,
            "wall_time": round(time.time(), 6),
        })
        self._record(stats, outcome, num_documents=documents.lengths.shape[0])
        self.last_stats = stats
        report = self._new_report("step", stats)
        retry_redis(lambda: self.broker.ack_consumed(stream, LEARNER_GROUP, [entry_id], CONSUMED_KEY, [message_id]),
                    "ack trained batch", self.outage_timeout_s)
        if not self.colocated:
            retry_redis(lambda: self.documents.delete(documents.batch_id), "delete documents", self.outage_timeout_s)
        self._forget_consumed(forgettable)
        if publishes:
            self._publish_weights()
        every = self.config.train.checkpoint_every
        if every and state.step % every == 0:
            self.checkpoint()  # with the report: it goes out only after the checkpoint
        self._write_progress()
        self._send(report)

    def _record(self, stats: dict, outcome: StepResult, num_documents: int) -> None:
        m = self.metrics
        m.learner_steps.inc()
        m.learner_step.set(self.state.step)
        m.skipped_steps.inc(int(outcome.skipped))
        for gauge, key in ((m.policy_loss, "policy_loss"), (m.ntp_loss, "ntp_loss"), (m.grad_norm, "grad_norm"),
                           (m.clip_fraction, "pg/clip_fraction"), (m.approx_kl, "pg/approx_kl"),
                           (m.learning_rate, "lr"), (m.eval_ntp_loss, "eval_ntp_loss"), (m.data_epoch, "data_epoch")):
            if key in stats:
                gauge.set(float(stats[key]))
        for phase in LEARNER_PHASES:
            if f"{phase}_seconds" in stats:
                m.step_seconds.labels(phase=phase).observe(float(stats[f"{phase}_seconds"]))
        if self.colocated:
            self._record_rollouts(stats, num_documents)

    def _record_rollouts(self, stats: dict, num_documents: int) -> None:
        """Colocated: the fused step samples and scores the rollouts itself, so the counters and gauges the
        rollout workers and reward replicas set in the disaggregated mode are this learner's to set."""
        m = self.metrics
        cfg = self.config.refine
        rollouts = num_documents * cfg.num_chunks * cfg.num_samples  # c positions x n samples per document
        m.rollouts.inc(rollouts)
        m.rollout_tokens.inc(rollouts * cfg.rollout_len)
        reward_type = self.config.refine.reward
        for gauge, key in ((m.reward_mean, "reward_mean"), (m.reward_std, "reward_std")):
            if key in stats:
                gauge.labels(reward_type=reward_type).set(float(stats[key]))
        if "entropy_selected" in stats:
            m.selected_entropy.set(float(stats["entropy_selected"]))

    def checkpoint(self) -> None:
        started = time.perf_counter()
        self._forget_recorded()
        save_learner_checkpoint(self.out_dir, self.model, self.optimizer, self.generator, self.tokenizer,
                                self.state, self.unrecorded, keep=self.config.train.keep_checkpoints)
        self.checkpointed_step = self.state.step
        self.metrics.step_seconds.labels(phase="checkpoint").observe(time.perf_counter() - started)

    # -- loop -----------------------------------------------------------------------------------

    def run(self, block_ms: int = 500) -> str:
        """Train until `train.steps` or a stop request; checkpoints on the way out; returns the
        last step's stats as JSON."""
        outage = OutageTolerance("learner", self.outage_timeout_s)
        try:
            try:
                while self.state.step < self.config.train.steps:
                    try:
                        if self.runtime.stop_requested():
                            logger.info("stop requested at step %d", self.state.step)
                            break
                        self.run_once(block_ms)
                        outage.succeeded()
                    except TRANSIENT as exc:
                        outage.failed(exc)
            except (RedisOutage, RedisStateLost):
                # Redis is gone for good (or lost the run's state), the steps trained since the last checkpoint are
                # not: a checkpoint needs only the disk, and keeps the reports the orchestrator could not write.
                if self.checkpointed_step != self.state.step:
                    self.checkpoint()
                raise
            if self.checkpointed_step != self.state.step:
                self.checkpoint()
            self._write_progress(done=True)
            if self.group is not None:
                self.group.send_stop()
                self.last_stats = self.last_stats | {"weights_digest": weights_digest(self.model)}
        finally:
            if self.group is not None:
                self.group.close()
            self.runtime.close()
        return json.dumps(self.last_stats)
