"""The service against the single-process loop: a disaggregated run at max_staleness=0 trains as `refine train
--local` in onepass mode does, and a colocated run as the loop's fused mode does, step for step."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from refine.loop import train
from service_helpers import step_rows, tiny_config
from services.orchestrator import run

pytestmark = pytest.mark.slow

COMPARED = ("loss", "ntp_loss", "policy_loss", "reward_mean", "reward_std", "grad_norm", "cursor", "data_epoch")


def test_a_service_run_at_staleness_0_trains_as_the_local_onepass_loop(ray_session, tmp_path: Path) -> None:
    """Each batch is rolled out with the weights it trains, from its own random stream (seeded by its data cursor),
    by a rollout worker; a reward replica scores it; the learner takes the one-pass update. The loop does all of
    it in one process. Six documents in batches of two: the stream wraps, so both count passes alike."""
    overrides = ["train.steps=5", "train.checkpoint_every=0", "data.num_documents=6", "train.mode=onepass"]
    run(tiny_config(tmp_path / "service", *overrides), progress=False)
    train(tiny_config(tmp_path / "local", *overrides), progress=False)

    check_same_training(tmp_path / "service" / "run", tmp_path / "local" / "run", steps=5)


def test_a_colocated_service_run_trains_as_the_local_fused_loop(ray_session, tmp_path: Path) -> None:
    """The colocated learner takes the fused step on each document batch, sampling from the run's generator as the
    loop does."""
    overrides = ["train.steps=3", "train.checkpoint_every=0", "data.num_documents=6"]
    run(tiny_config(tmp_path / "service", *overrides, "service.mode=colocated"), progress=False)
    train(tiny_config(tmp_path / "local", *overrides, "train.mode=fused"), progress=False)
    check_same_training(tmp_path / "service" / "run", tmp_path / "local" / "run", steps=3)


def check_same_training(service_run: Path, local_run: Path, steps: int) -> None:
    """Every step's row (the COMPARED stats) and the final weights equal, to the last bit."""
    service_rows, local_rows = step_rows(service_run), step_rows(local_run)
    assert [row["step"] for row in service_rows] == [row["step"] for row in local_rows] == list(range(1, steps + 1))
    if steps > 3:
        assert max(row["data_epoch"] for row in local_rows) >= 1  # the stream wrapped within the run
    for service, local in zip(service_rows, local_rows):
        assert {key: service[key] for key in COMPARED} == {key: local[key] for key in COMPARED}, service["step"]
    served = load_file(service_run / "checkpoints" / "latest" / "model" / "model.safetensors")
    looped = load_file(local_run / "checkpoints" / "latest" / "model" / "model.safetensors")
    assert served.keys() == looped.keys()
    assert all((served[name] - looped[name]).abs().max() == 0 for name in served)
