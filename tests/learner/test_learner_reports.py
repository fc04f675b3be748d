"""The learner keeps in its checkpoints the reports the orchestrator has not confirmed writing (real Redis)."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from learner.checkpoint import latest_checkpoint, read_checkpoint_reports, read_learner_state
from learner.learner import Learner
from refine.config import load_config
from services.messages import DataCursor, DocumentBatch
from services.progress import write_recorded
from services.streams import DOCUMENTS, LEARNER_GROUP, document_batch_id_for

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
        learner.broker.ensure_group(DOCUMENTS, LEARNER_GROUP, start_id="0")
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
