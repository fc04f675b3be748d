"""`refine train` on the distributed service: local Ray, real Redis, tiny model."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from learner.checkpoint import read_learner_state
from refine.cli import main
from refine.config import load_config
from refine.config_parsing import ConfigError
from refine.data.sources import BadRowError
from refine.models import load_model
from refine.step import MAX_SKIPPED_IN_A_ROW
from service_helpers import SERVICE_TINY, step_rows, tiny_config, tiny_overrides
from services.broker import Broker
from services.failures import ServiceError
from services.orchestrator import run
from services.redis_server import connect
from services.run_checks import check_service_config, with_service_train_mode
from services.streams import DOCUMENTS
from rollout_workers.vllm_engine import vllm_available

pytestmark = pytest.mark.slow


def test_refine_train_disaggregated_end_to_end(ray_session, tmp_path: Path, capsys) -> None:
    steps = 5
    overrides = [*tiny_overrides(tmp_path), f"train.steps={steps}", "service.num_rollout_workers=2",
                 "service.num_reward_replicas=1", "optim.schedule=cosine"]
    args = ["train", str(SERVICE_TINY), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    scraped: dict[str, str] = {}
    finished = threading.Event()
    scraper = threading.Thread(target=scrape_every_role, args=(tmp_path / "prometheus", scraped, finished))
    scraper.start()
    try:
        assert main(args) == 0
    finally:
        finished.set()
        scraper.join()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = tmp_path / "run"

    rows = step_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert [row["lr"] for row in rows] == pytest.approx([1e-4 * (1 + math.cos(math.pi * k / 5)) / 2 for k in range(5)])
    # On-policy (max_staleness = 0): step t trains on rollouts made with the weights after t - 1 steps,
    # so workers did pick up every refreshed version.
    assert [row["policy_version"] for row in rows] == list(range(steps))
    assert all(row["staleness"] == 0 for row in rows)
    assert rows[-1]["weight_version"] == steps
    assert len({row["rollout_batch_id"] for row in rows}) == steps
    assert {row["worker_id"].split(".")[0] for row in rows} <= {"rollout_worker-0", "rollout_worker-1"}
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert printed["step"] == steps and printed["loss"] == rows[-1]["loss"]
    for row in rows:  # the learner's update time, and the stages it was spent in
        assert row["forward_seconds"] + row["backward_step_seconds"] <= row["step_seconds"]

    checkpoint = run_dir / "checkpoints" / "latest"
    state = read_learner_state(checkpoint)
    assert (state.step, state.weight_version) == (steps, steps)
    assert state.cursor == rows[-1]["cursor"]
    model = load_model(checkpoint / "model")
    assert model.config.hidden_size == 64
    assert (run_dir / "config.yaml").exists() and (run_dir / "losses.png").exists()
    # train.mode left out (fused by default): the run says what it trained.
    assert load_config(run_dir / "config.yaml").train.mode == "onepass"
    # Every role served Prometheus metrics while it ran, and withdrew its discovery file on exit.
    assert set(scraped) == {"orchestrator", "learner", "rollout_worker", "reward"}
    for role, name in (("learner", "refine_learner_steps_total"), ("learner", "refine_ntp_loss"),
                       ("learner", "refine_data_epoch"),
                       ("rollout_worker", "refine_rollouts_total"), ("rollout_worker", "refine_weight_version"),
                       ("reward", "refine_scored_batches_total"), ("orchestrator", "refine_documents_total")):
        assert f"\n{name} " in scraped[role], (role, name)
    assert list((tmp_path / "prometheus").glob("*.json")) == []


def scrape_every_role(discovery_dir: Path, scraped: dict[str, str], finished: threading.Event) -> None:
    """Scrape each target announced in the file-discovery directory (as Prometheus would), by role."""
    while not finished.is_set():
        for path in discovery_dir.glob("*.json"):
            try:
                (target,) = json.loads(path.read_text())
                url = f"http://{target['targets'][0]}/metrics"
                scraped[target["labels"]["role"]] = urllib.request.urlopen(url, timeout=2).read().decode()
            except (OSError, ValueError):
                continue  # withdrawn between listing and reading
        time.sleep(0.05)


def test_colocated_runs_the_fused_step_without_workers(ray_session, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=3", "service.mode=colocated", "train.log_every=2",
                         "optim.warmup_steps=4")
    stats = run(config, progress=False)
    rows = step_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [2, 3]  # every train.log_every steps, and the last
    assert [row["lr"] for row in rows] == pytest.approx([1e-4 * 2 / 4, 1e-4 * 3 / 4])  # still warming up
    assert "worker_id" not in rows[0]  # no rollout workers: the learner sampled its own rollouts
    stages = ("forward", "select", "states", "decode", "teacher_forced", "score", "backward_step")
    assert all(sum(row[f"{stage}_seconds"] for stage in stages) <= row["step_seconds"] for row in rows)
    assert stats["step"] == 3 and stats["reward_mean"] == rows[-1]["reward_mean"]


def test_the_learner_measures_the_heldout_loss_and_the_driver_writes_those_rows(ray_session, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=3", "service.mode=colocated", "train.log_every=3",
                         "data.eval_source=synthetic", "data.eval_documents=2", "train.eval_every=2")
    run(config, progress=False)
    rows = step_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [2, 3]  # step 2: only for its held-out loss
    assert all(row["eval_ntp_loss"] > 0 and row["eval_seconds"] > 0 for row in rows)


def test_a_missing_eval_source_fails_before_anything_starts(tmp_path: Path) -> None:
    missing = tmp_path / "heldout.jsonl"
    with pytest.raises(ConfigError, match=f"data.eval_source='{missing}': data path .* does not exist"):
        run(tiny_config(tmp_path, f"data.eval_source={missing}"), progress=False, redis_url="redis://127.0.0.1:1/0")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_diverged_run_stops_with_an_error_naming_its_settings(ray_session, tmp_path: Path) -> None:
    """Every step skipped as not finite: the service ends the run, as the local loop does, instead of a success."""
    steps = MAX_SKIPPED_IN_A_ROW + 3
    config = tiny_config(tmp_path, f"train.steps={steps}", "service.mode=colocated", "refine.lambda_ntp=1e300")
    with pytest.raises(ValueError, match=rf"steps 1..{MAX_SKIPPED_IN_A_ROW} were all skipped for a non-finite loss "
                                         r"or gradient, from the first: .* \(refine.lambda_ntp=1e\+300, "):
        run(config, progress=False)
    rows = step_rows(tmp_path / "run")
    assert len(rows) < steps and all(row["skipped_nonfinite"] == 1.0 for row in rows)


def test_a_message_no_role_can_use_ends_the_run_with_its_error(ray_session, redis_url: str, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=1000")
    broker = Broker(connect(redis_url), config.service.namespace)

    def inject_garbage() -> None:
        deadline = time.monotonic() + 60
        while not broker.client.exists(broker.key("learner", "progress")) and time.monotonic() < deadline:
            time.sleep(0.05)
        broker.client.xadd(broker.key("stream", DOCUMENTS), {b"m": b"not a message", b"t": b"DocumentBatch"})

    injector = threading.Thread(target=inject_garbage)
    injector.start()
    try:
        with pytest.raises(ServiceError, match="stream 'documents' could not be used"):
            run(config, progress=False, redis_url=redis_url)
    finally:
        injector.join()


def test_a_bad_data_row_ends_the_run_after_the_learner_checkpoints(ray_session, tmp_path: Path) -> None:
    """The orchestrator fails on a malformed row (checkpoint_every=0): the learner still saves the steps
    it trained, metrics.jsonl records exactly those, and the error reaches the caller."""
    source = tmp_path / "data.jsonl"
    rows = [json.dumps({"text": f"document {index} " + "alpha beta gamma delta " * 20}) for index in range(12)]
    source.write_text("\n".join([*rows, "{this is not json", *rows[:4]]) + "\n")
    config = tiny_config(tmp_path, "service.mode=colocated", "train.steps=1000", "train.checkpoint_every=0",
                         f"data.source={source}")
    with pytest.raises(BadRowError, match="line 13: malformed JSON"):
        run(config, progress=False)
    trained = step_rows(tmp_path / "run")
    assert trained, "the learner trained nothing before the bad row: the test proves nothing"
    state = read_learner_state(tmp_path / "run" / "checkpoints" / "latest")
    assert state.step == len(trained) == trained[-1]["step"]
    assert state.cursor == trained[-1]["cursor"]


@pytest.mark.parametrize("overrides, message", [
    (["train.mode=ntp"], "train.mode='ntp'"),
    (["refine.reward=no_such_reward"], "refine.reward='no_such_reward' is not a registered reward"),
    (["service.mode=colocated", "refine.reward=no_such_reward"],
     "refine.reward='no_such_reward' is not a registered reward"),
    (["service.mode=colocated", "refine.reward=qa_f1"], "refine.reward='qa_f1' scores decoded text"),
    (["service.max_staleness=0", "service.sync_interval=3"], "service.max_staleness=0"),
    (["service.mode=colocated", "train.mini_batches=2"], "train.mini_batches=2 needs service.mode='disaggregated'"),
    (["service.mode=colocated", "train.micro_batches=2"], "train.micro_batches=2 needs service.mode='disaggregated'"),
    # The service trains what service.mode says, one-pass or fused: a train.mode given for the other is refused.
    (["service.mode=colocated", "train.mode=onepass"],
     r"train.mode='onepass' is not what service.mode='colocated' trains \('fused', whatever train.mode says\): set "
     r"service.mode='disaggregated' to train 'onepass' on the service, or train.mode='fused' \(or leave it out\), "
     r"or train 'onepass' in one process with --local"),
    (["train.mode=fused"], r"train.mode='fused' is not what service.mode='disaggregated' trains \('onepass', .*set "
                           r"service.mode='colocated' to train 'fused' on the service, or train.mode='onepass'"),
    # What only the disaggregated mode reads, given to a colocated run.
    (["service.mode=colocated", "service.max_staleness=2"],
     r"^service.max_staleness=2 is not read with service.mode='colocated': it paces the rollout workers and reward "
     r"replicas of service.mode='disaggregated', .* leave it out, or set service.mode='disaggregated'$"),
    (["service.mode=colocated", "service.sync_interval=2", "service.num_rollout_workers=3",
      "service.num_reward_replicas=2"],
     r"^service.num_rollout_workers=3, service.num_reward_replicas=2, service.sync_interval=2 are not read with "
     r"service.mode='colocated'"),
])
def test_configs_the_service_cannot_run_are_rejected(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_service_config(tiny_config(tmp_path, *overrides))


def test_a_train_mode_is_accepted_where_the_service_trains_it_and_recorded_when_left_out(tmp_path: Path) -> None:
    check_service_config(tiny_config(tmp_path, "train.mode=onepass"))
    check_service_config(tiny_config(tmp_path, "train.mode=fused", "service.mode=colocated"))
    # Left at its default (fused): the disaggregated run records the one-pass update it trains.
    config = tiny_config(tmp_path)
    assert "mode" not in config.train.model_fields_set
    check_service_config(config)
    assert with_service_train_mode(config).train.mode == "onepass"
    assert with_service_train_mode(tiny_config(tmp_path, "service.mode=colocated")).train.mode == "fused"
    assert config.train.mode == "fused"  # a copy


def test_a_colocated_run_takes_the_disaggregated_settings_at_their_defaults(tmp_path: Path) -> None:
    """configs/service_tiny.yaml names them at their defaults (and service.worker_cpus, which is not judged: the
    config sizes its workers with it); service.batches_in_flight paces the colocated learner's batches too."""
    check_service_config(tiny_config(tmp_path, "service.mode=colocated", "service.batches_in_flight=4"))
    check_service_config(tiny_config(tmp_path, "service.mode=colocated", "service.max_staleness=0",
                                     "service.num_rollout_workers=2"))


def test_task_rewards_are_accepted_where_their_text_is_decoded(tmp_path: Path) -> None:
    check_service_config(tiny_config(tmp_path, "refine.reward=qa_f1"))  # the reward replicas decode rollouts
    check_service_config(tiny_config(tmp_path, "service.mode=colocated", "refine.reward=hybrid"))
    check_service_config(tiny_config(tmp_path, "train.mini_batches=2"))  # the disaggregated learner takes them


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here: the refusal is for a Python without it")
def test_the_vllm_engine_without_vllm_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """Else every rollout worker died on import and was restarted until the run gave up (two minutes)."""
    with pytest.raises(ValueError, match=r"rollout.engine='vllm' needs vLLM, which this Python .* does not have: "
                                         r"create its environment with `bash scripts/setup_vllm_env.sh`"):
        check_service_config(tiny_config(tmp_path, "rollout.engine=vllm", "model.hidden_size=128"))
