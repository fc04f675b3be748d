"""Learner ranks 1..R-1 (a Ray actor each): they take rank 0's batches through the process group
and step the same optimizer on their share of the documents (see learner/data_parallel.py).
They read and write nothing in Redis: rank 0 owns the streams, checkpoints and weights."""

from __future__ import annotations

import json
import logging

import torch

from learner.checkpoint import latest_checkpoint, load_learner_checkpoint
from learner.data_parallel import DataParallelGroup, learner_device, weights_digest
from refine.config import RunConfig, run_tokenizer
from refine.evaluation.heldout import heldout_evaluator
from refine.loop import prepare_model
from refine.optim import learning_rate, set_learning_rate
from refine.runtime import tune_allocator
from refine.step import make_optimizer
from services.source_digest import check_sources

__all__ = ["LearnerReplica"]

logger = logging.getLogger(__name__)


class LearnerReplica:
    def __init__(self, config_json: str, rank: int, address: str, resume: bool = False,
                 sources: str | None = None) -> None:
        """`sources`: the driver's SourceStamp (JSON); other sources here refuse the start (services/source_digest)."""
        check_sources(sources)  # first: another version of the code may not even read the config
        self.config = config = RunConfig.model_validate_json(config_json)
        config.train.device = learner_device(config.train.device)  # the GPU Ray gave this rank, not cuda:0 of all
        self.rank = rank
        self.address = address
        tune_allocator()
        torch.set_num_threads(config.train.threads or 1)
        self.model = prepare_model(config)
        self.optimizer = make_optimizer(self.model, config.optim)
        generator = torch.Generator(device=config.train.device).manual_seed(config.train.seed)
        self.ref_model = None
        if config.refine.kl_coef > 0:
            self.ref_model = prepare_model(config, training=False).requires_grad_(False)
        self.steps = 0
        self.group: DataParallelGroup | None = None
        # Rank 0 measures the held-out loss after a step with every rank, each on its share of the documents.
        self.evaluate = None if config.data.eval_source is None else heldout_evaluator(
            config, self.model, run_tokenizer(config), rank=rank, world_size=config.service.num_learners,
            sum_over_ranks=lambda values: self.group.sum(values), warn=False)
        checkpoint = latest_checkpoint(config.train.out_dir)
        if resume and checkpoint.exists():  # the optimizer state is not broadcast: load it as rank 0 does
            self.steps = load_learner_checkpoint(checkpoint, self.model, self.optimizer, generator).step

    def run(self) -> str:
        """Join the group, then step with rank 0 until it says stop; returns JSON with the step
        count and the digest of the weights (equal on every rank)."""
        service = self.config.service
        self.group = group = DataParallelGroup(self.address, self.rank, service.num_learners,
                                               self.config.train.device,
                                               timeout_s=max(300.0, 10 * service.heartbeat_timeout_s))
        try:
            group.broadcast_parameters(self.model, self.optimizer)
            while (received := group.receive_batch()) is not None:
                scored, documents = received
                # The step rank 0 takes: it and every replica count the same steps from the same checkpoint.
                set_learning_rate(self.optimizer, learning_rate(self.config.optim, self.steps + 1,
                                                                self.config.train.steps))
                group.update(self.model, self.optimizer, scored, documents, self.config, self.ref_model)
                self.steps += 1
                if self.evaluate is not None and self.config.train.evaluates_step(self.steps):
                    self.evaluate()  # rank 0 reports it
        finally:
            group.close()
        return json.dumps({"rank": self.rank, "step": self.steps, "weights_digest": weights_digest(self.model)})
