"""Data parallelism over learner ranks: a 2-rank run steps both ranks identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.data_parallel import weights_digest
from refine.config import run_tokenizer
from refine.evaluation.heldout import heldout_documents, heldout_ntp_loss
from refine.loop import prepare_model
from refine.models import load_model
from service_helpers import step_rows, tiny_config
from services.orchestrator import run
from services.run_checks import check_service_config

pytestmark = pytest.mark.slow


def test_two_learner_ranks_train_and_end_with_equal_weights(ray_session, tmp_path: Path) -> None:
    steps = 3
    # Two mini-batches of two documents: each optimizer step splits its mini-batch over the ranks. Every rank
    # sets the scheduled learning rate itself: one that did not would end with other weights.
    config = tiny_config(tmp_path, f"train.steps={steps}", "service.num_learners=2", "train.batch_size=4",
                         "train.mini_batches=2", "service.num_rollout_workers=1", "train.checkpoint_every=0",
                         "optim.lr=1e-3", "optim.warmup_steps=1", "optim.schedule=cosine", "optim.min_lr_ratio=0.1")
    stats = run(config, progress=False)  # raises if rank 1 fails or its weights differ from rank 0's
    rows = step_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert [row["lr"] for row in rows] == pytest.approx([1e-3, 1e-3, 5.5e-4])  # the cosine from step 2
    assert all(row["data_parallel_ranks"] == 2 for row in rows)
    assert all(torch.isfinite(torch.tensor(row["grad_norm"])) for row in rows)
    # Rank 0's final weights (reported, and checked against rank 1's by the orchestrator) are the
    # checkpointed ones, and they moved away from the initial weights.
    model = load_model(tmp_path / "run" / "checkpoints" / "latest" / "model")
    assert stats["weights_digest"] == weights_digest(model)
    assert weights_digest(prepare_model(config)) != stats["weights_digest"]


def test_micro_batches_on_two_ranks_take_the_step_of_one_learner_on_the_whole_batch(ray_session,
                                                                                    tmp_path: Path) -> None:
    """Gradient accumulation in the service: each rank's two documents run as two micro-batches, and the step
    equals a single learner's on all four at once (float32 rounding). The held-out loss, each rank measuring
    its share of the documents, is the one learner's too."""
    common = ("train.steps=1", "train.batch_size=4", "service.num_rollout_workers=1", "train.checkpoint_every=0",
              "data.eval_source=synthetic", "data.eval_documents=3")
    run(tiny_config(tmp_path / "one", *common), progress=False)
    run(tiny_config(tmp_path / "micro", *common, "service.num_learners=2", "train.micro_batches=2"), progress=False)
    (one,), (micro,) = step_rows(tmp_path / "one" / "run"), step_rows(tmp_path / "micro" / "run")
    assert micro["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)  # the whole batch's, summed over ranks
    for key in ("ntp_loss", "policy_loss", "loss"):  # the whole batch's too, not rank 0's documents alone
        assert micro[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    config = tiny_config(tmp_path / "micro", *common)
    whole = heldout_ntp_loss(load_model(tmp_path / "micro" / "run" / "checkpoints" / "latest" / "model"),
                             heldout_documents(config, run_tokenizer(config)), 1)
    assert micro["eval_ntp_loss"] == pytest.approx(whole, rel=1e-6)  # both ranks' documents, rank 1's too
    assert micro["eval_ntp_loss"] == pytest.approx(one["eval_ntp_loss"], rel=1e-5)
    a = load_model(tmp_path / "one" / "run" / "checkpoints" / "latest" / "model").state_dict()
    b = load_model(tmp_path / "micro" / "run" / "checkpoints" / "latest" / "model").state_dict()
    initial = prepare_model(tiny_config(tmp_path / "one", *common)).state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a[name], initial[name]) for name in a)


def test_several_learners_need_the_disaggregated_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="service.num_learners=2"):
        check_service_config(tiny_config(tmp_path, "service.mode=colocated", "service.num_learners=2"))


def test_more_learners_than_documents_in_a_mini_batch_are_refused(tmp_path: Path) -> None:
    """Rank 1 of two trained on nothing when each mini-batch held one document, without a word."""
    with pytest.raises(ValueError, match=r"service.num_learners=2 splits .* train.batch_size=2 in "
                                         r"train.mini_batches=2 makes mini-batches of 1: ranks 1 and up"):
        check_service_config(tiny_config(tmp_path, "service.num_learners=2", "train.mini_batches=2"))
    check_service_config(tiny_config(tmp_path, "service.num_learners=2", "train.batch_size=4",
                                     "train.mini_batches=2"))
