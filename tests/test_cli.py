"""The `refine` command line: model inspection and clear errors."""

import json
import math
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from refine.cli import as_trained, build_parser, check_service_branch, main, unused_vllm_engine
from refine.config import DEMO_DEFAULTS, load_config, run_tokenizer
from refine.models import build_model, save_model

REPO = Path(__file__).resolve().parents[1]


def test_model_inspect_reports_architecture_parameters_and_state(tmp_path, capsys):
    # bfloat16 weights: the recurrent states stay float32, so bytes are not elements x the weights' size.
    model = build_model(dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16,
                             num_hidden_layers=2, vocab_size=50, intermediate_size=48), dtype=torch.bfloat16)
    save_model(model, tmp_path)
    assert main(["model", "inspect", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "gated_deltanet"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    # Per layer: recurrent state H x K x V = 2 x 16 x 32, three conv caches (conv_size - 1) x dim.
    per_layer = 2 * 16 * 32 + 3 * (32 + 32 + 64)
    assert info["recurrent_state_elements_per_sequence"] == 2 * per_layer
    state = model(torch.zeros(1, 1, dtype=torch.long)).state
    assert info["recurrent_state_bytes_per_sequence"] == sum(
        t.numel() * t.element_size() for layer in state.layers for t in layer.values())
    assert info["recurrent_state_bytes_per_sequence"] > 2 * per_layer * torch.bfloat16.itemsize
    shapes = info["state_tensors_per_layer"]
    assert sum(math.prod(shape) for shape in shapes.values()) == per_layer


def test_errors_exit_2_with_the_field(tmp_path, capsys):
    assert main(["train", "--local", "--set", "refine.num_chunks=0", "--set", "demo=null"]) == 2
    assert "refine.num_chunks" in capsys.readouterr().err
    assert main(["model", "inspect", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_an_unreachable_redis_is_one_line_naming_the_url(tmp_path, capsys):
    """A service run told to use a Redis nobody answers at stops before starting Ray, without a traceback."""
    url = "redis://127.0.0.1:1/0"  # port 1: nothing listens there
    argv = ["train", "--set", "demo=null", "--set", f"train.out_dir={tmp_path / 'run'}", "--redis-url", url]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refine: error:") and url in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing made before the check


@pytest.mark.parametrize("error", [IsADirectoryError, PermissionError, NotADirectoryError, FileExistsError])
def test_an_os_error_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch, error):
    """A path that cannot be read or written is bad input or setup, not a crash: no traceback."""
    def unreadable(path):
        raise error(13, "cannot use it", str(tmp_path / "model.safetensors"))

    monkeypatch.setattr("refine.models.load_model", unreadable)
    assert main(["model", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"refine: error: [Errno 13] cannot use it: '{tmp_path / 'model.safetensors'}'\n"


def _damage_config(text):
    return lambda model_dir: (model_dir / "config.json").write_text(text)


def _hidden_size_abc(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"hidden_size": "abc"}))


def _config_is_a_directory(model_dir):
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").mkdir()


def _empty_index(model_dir):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text("{}")


def _truncated_weights(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


DAMAGED_MODELS = {  # damage, the file the error names
    "config not json": (_damage_config("{bad"), "config.json"),
    "config a list": (_damage_config("[1]"), "config.json"),
    "config bad value": (_hidden_size_abc, "config.json"),
    "config a directory": (_config_is_a_directory, "config.json"),
    "weights garbage": (lambda model_dir: (model_dir / "model.safetensors").write_bytes(b"\x01" * 200),
                        "model.safetensors"),
    "weights truncated": (_truncated_weights, "model.safetensors"),
    "index without weight_map": (_empty_index, "model.safetensors.index.json"),
}


@pytest.mark.parametrize("damage,named", DAMAGED_MODELS.values(), ids=DAMAGED_MODELS.keys())
def test_model_inspect_of_a_damaged_directory_is_one_line_naming_the_file(tmp_path, capsys, damage, named):
    save_model(build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                                vocab_size=50)), tmp_path)
    damage(tmp_path)
    assert main(["model", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refine: error: {tmp_path / named}") and err.count("\n") == 1, err
    assert "https://" not in err


# The main job shrunk, so that a run that did train first (the defect) would show it within seconds.
SHRUNK_DEMO = ["demo.pretrain_steps=1", "demo.branch_steps=1", "demo.eval_examples=2", "demo.heldout_documents=2",
               "data.seq_len=512", "data.num_documents=16", "train.batch_size=2", "model.hidden_size=32",
               "model.intermediate_size=64", "demo.eval_length=384", "refine.margin=4"]


@pytest.mark.parametrize("reward, words", [
    ("nope", ["refine.reward='nope' is not a registered reward", "'cosine'"]),
    ("qa_f1", ["refine.reward='qa_f1' scores decoded text", "service.mode='disaggregated'"]),
])
def test_the_main_job_refuses_a_reward_it_cannot_score_before_training(tmp_path, capsys, reward, words):
    """Not after the NTP pre-training stage (minutes), at the REFINE branch's first step."""
    argv = ["train", "--local", "--no-progress", "--set", f"train.out_dir={tmp_path / 'run'}",
            "--set", f"refine.reward={reward}"]
    for item in SHRUNK_DEMO:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refine: error:") and all(word in err for word in words), err
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_the_main_jobs_refine_branch_on_the_service_records_the_mode_it_trains(tmp_path, capsys):
    """The service trains one-pass (disaggregated) or fused (colocated) whatever train.mode says: the branch's
    config, and so its config.yaml, says which; the stages in this process keep theirs."""
    from refine.experiment import stage_config
    from services.run_checks import check_service_config

    service, local = build_parser().parse_args(["train"]), build_parser().parse_args(["train", "--local"])
    for mode, trained in (("disaggregated", "onepass"), ("colocated", "fused")):
        config = load_config(None, [f"train.out_dir={tmp_path}", f"service.mode={mode}"], defaults=DEMO_DEFAULTS)
        tokenizer = run_tokenizer(config)
        branch = stage_config(config, "refine", "fused", 1, 1e-3, None, tokenizer)
        assert as_trained(branch, service).train.mode == trained
        check_service_config(as_trained(branch, service))  # the service takes it: the mode it trains
        assert as_trained(branch, local).train.mode == "fused"
        ntp = stage_config(config, "ntp", "ntp", 1, 1e-3, None, tokenizer)
        assert as_trained(ntp, service) is ntp
    # A train.mode the config gives for the other service.mode is said before anything trains (configs/demo.yaml
    # names fused for its --local run); left out (the main job's default), nothing is said.
    check_service_branch(load_config(REPO / "configs" / "demo.yaml", [f"train.out_dir={tmp_path}"]))
    assert ("the main job's REFINE branch trains train.mode=onepass on the service (service.mode='disaggregated'), "
            "not train.mode=fused, and its config.yaml says so: --local trains it fused") in capsys.readouterr().err
    check_service_branch(load_config(None, [f"train.out_dir={tmp_path}"], defaults=DEMO_DEFAULTS))
    assert capsys.readouterr().err == ""


def test_the_main_job_refuses_settings_its_service_branch_would_not_read_before_training(tmp_path, capsys):
    """Not after the NTP pre-training stage (minutes), when the REFINE branch starts on the service."""
    argv = ["train", "--no-progress", "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "service.mode=colocated",
            "--set", "service.max_staleness=2", "--redis-url", "redis://127.0.0.1:1/0"]  # never reached
    for item in SHRUNK_DEMO:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refine: error: service.max_staleness=2 is not read with service.mode='colocated'" in err, err
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_a_service_run_refuses_an_unknown_reward_before_ray_starts(tmp_path, capsys):
    argv = ["train", "--no-progress", "--set", "demo=null", "--set", f"train.out_dir={tmp_path}",
            "--set", "refine.reward=nope", "--redis-url", "redis://127.0.0.1:1/0"]  # never reached
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refine.reward='nope' is not a registered reward" in err and "127.0.0.1:1" not in err


def test_posttrain_refuses_a_text_reward_before_reading_anything(tmp_path, capsys):
    model = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                             vocab_size=260, intermediate_size=32))
    save_model(model, tmp_path / "init")
    argv = ["posttrain", "--data", str(tmp_path / "qa.jsonl"), "--task", "ruler-qa", "--no-progress",
            "--set", f"train.init_from={tmp_path / 'init'}", "--set", f"train.out_dir={tmp_path / 'run'}",
            "--set", "refine.reward=substring_match"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refine.reward='substring_match' scores decoded text" in err and "qa.jsonl" not in err
    assert not (tmp_path / "run").exists()


def test_the_printed_run_directory_is_absolute(tmp_path, capsys, monkeypatch):
    """Under `ray job submit` a relative train.out_dir lies in Ray's copy of the working directory: the line a
    run prints says where its files are."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--local", "--no-progress", "--set", "demo=null", "--set", "train.mode=ntp", "--set",
            "train.steps=1", "--set", "data.num_documents=4", "--set", "train.out_dir=runs/rel"]
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["out_dir"] == str(tmp_path / "runs" / "rel") and (tmp_path / "runs" / "rel" / "metrics.jsonl").exists()


def test_local_says_the_service_addresses_it_was_given_go_unused(tmp_path, capsys):
    argv = ["train", "--local", "--no-progress", "--set", "demo=null", "--set", "train.mode=ntp", "--set",
            "train.steps=1", "--set", "data.num_documents=4", "--set", f"train.out_dir={tmp_path}",
            "--redis-url", "redis://127.0.0.1:1/0"]
    assert main(argv) == 0
    assert "--redis-url unused: --local trains in this process" in capsys.readouterr().err
    # Without --local too: an NTP-only run has no rollouts to distribute, so it trains in this process.
    argv = [arg for arg in argv if arg != "--local"] + ["--ray-address", "127.0.0.1:1"]
    assert main(argv) == 0
    assert ("--ray-address and --redis-url unused: train.mode=ntp (no rollouts to distribute) trains in this "
            "process, without Ray or Redis") in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "started"), [("--ray-address", "a local Ray"), ("--redis-url", "an embedded Redis")])
def test_an_empty_service_address_flag_is_refused(flag, started, tmp_path, capsys):
    """`--redis-url "$REDIS_URL"` with the variable unset trained on an embedded Redis, exit 0, as if left out."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "configs/service_tiny.yaml", "--set", f"train.out_dir={tmp_path}", flag, ""])
    assert exit_.value.code == 2
    assert f"argument {flag}: is empty (''): leave the flag out to start {started} for the run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_samples_in_process_says_the_vllm_engine_goes_unused(tmp_path, capsys):
    argv = ["train", "--local", "--no-progress", "--set", "demo=null", "--set", "train.mode=onepass", "--set",
            "train.steps=1", "--set", "data.num_documents=4", "--set", f"train.out_dir={tmp_path}", "--set",
            "rollout.engine=vllm"]
    assert main(argv) == 0
    assert "rollout.engine='vllm' unused: --local samples its rollouts in the training process" in \
        capsys.readouterr().err
    colocated = load_config(None, ["rollout.engine=vllm", "service.mode=colocated"])
    assert unused_vllm_engine(colocated, build_parser().parse_args(["train"])) == "service.mode='colocated'"
    disaggregated = load_config(None, ["rollout.engine=vllm"])
    assert unused_vllm_engine(disaggregated, build_parser().parse_args(["train"])) is None


@pytest.fixture
def no_ray_start(monkeypatch):
    """Ray looks uninitialized; ray.init reads its address as Ray does, and starting or connecting fails the test."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    def parse_only(address=None, **kwargs):
        if address is not None:
            canonicalize_bootstrap_address(address)
        raise AssertionError("ray.init would start or connect to a Ray")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", parse_only)


SMALL_SERVICE_RUN = ["--no-progress", "--set", "demo=null", "--set", "data.num_documents=4"]


@pytest.mark.parametrize("address,words", [
    # Ray before 2.49 reads no malformed address before connecting, past what no_ray_start runs of ray.init.
    pytest.param("garbage", ["Ray address 'garbage' (--ray-address): Invalid address format: garbage; give HOST:PORT "
                             "of the head's GCS"],
                 marks=pytest.mark.skipif(Version(version("ray")) < Version("2.49"),
                                          reason=f"Ray {version('ray')} refuses 'garbage' only while connecting")),
    ("http://127.0.0.1:8265", ["Ray address 'http://127.0.0.1:8265' (--ray-address) is an HTTP address: that is the "
                               "dashboard's", "HOST:PORT of the head's GCS"]),
])
def test_a_wrong_ray_address_is_one_line_naming_the_flag(tmp_path, capsys, no_ray_start, address, words):
    argv = ["train", *SMALL_SERVICE_RUN, "--set", f"train.out_dir={tmp_path}",
            "--set", f"service.metrics_discovery_dir={tmp_path / 'prometheus'}", "--ray-address", address]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refine: error:") and err.count("\n") == 1 and all(word in err for word in words), err


def test_a_metrics_discovery_dir_that_is_a_file_fails_before_ray_starts(tmp_path, capsys, no_ray_start):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    argv = ["train", *SMALL_SERVICE_RUN, "--set", f"train.out_dir={tmp_path / 'run'}",
            "--set", f"service.metrics_discovery_dir={blocker}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"service.metrics_discovery_dir='{blocker}': it is a file, not a directory" in err and "Errno" not in err


def test_a_users_module_named_as_a_project_package_fails_before_ray_starts(tmp_path, capsys, monkeypatch,
                                                                          no_ray_start):
    """Ray's actors import from the run's working directory first: a user's reward.py there broke them at start."""
    (tmp_path / "reward.py").write_text("def distinct_tokens(inputs):\n    return None\n")
    monkeypatch.chdir(tmp_path)
    argv = ["train", *SMALL_SERVICE_RUN, "--set", f"train.out_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'reward.py'} would hide the project's 'reward' package" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["refine.selection_temperature=1e-38", "refine.temperature=1e-45",
                                     "service.heartbeat_timeout_s=1e300", "model.initializer_range=1e300",
                                     "model.norm_eps=1e300", "model.expand_k=1e306"])
def test_extreme_finite_floats_fail_at_the_config_naming_the_field(tmp_path, capsys, setting):
    """Were a traceback from torch.multinomial, `new_logprobs contains NaN or Inf` and Redis' `Invalid
    min-idle-time argument for XAUTOCLAIM`, each after training had started; NaN weights (initializer_range),
    norms that output zeros (norm_eps) and an OverflowError traceback (expand_k)."""
    argv = ["train", "--local", "--no-progress", "--set", "demo=null", "--set", f"train.out_dir={tmp_path}",
            "--set", "train.steps=1", "--set", "data.num_documents=4", "--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err
    field, value = setting.split("=")
    assert err.startswith("refine: error: invalid configuration:") and field in err and value in err, err
    assert "Traceback" not in err and not (tmp_path / "metrics.jsonl").exists()


def test_a_yaml_alias_bomb_is_one_line_naming_the_limit(tmp_path, capsys, monkeypatch):
    from refine.config import RunConfig
    from refine.config_parsing import MAX_ALIAS_VALUES

    lines = ["data:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")

    def validate(*args, **kwargs):
        raise AssertionError("the alias bomb reached validation")

    monkeypatch.setattr(RunConfig, "model_validate", validate)  # the old code walked all 9 ** 8 strings there
    assert main(["train", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    limit = MAX_ALIAS_VALUES
    assert err.startswith(f"refine: error: config file {path}: YAML aliases stand for more than {limit} values")
    assert err.count("\n") == 1 and len(err) < 400, err


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    import refine.cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(refine.cli, "_score", interrupted)
    assert refine.cli.main(["score", "--task", "niah"]) == 130
    assert capsys.readouterr().err == "refine: interrupted\n"


def test_eval_help_states_the_length_and_answer_limits(capsys):
    from refine.data.tasks import MAX_GEN_TOKENS
    from refine.config import MAX_SYNTHETIC_LENGTH

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    length = f"--length LENGTH synthetic prompt length in tokens (niah, mqar; default 512), at most {MAX_SYNTHETIC_LENGTH}"
    assert length in text
    assert f"--max-new-tokens MAX_NEW_TOKENS tokens per answer, at most {MAX_GEN_TOKENS}" in text


def test_a_local_run_that_kill_stops_exits_130_with_a_checkpoint_at_its_last_step(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from refine.config import dump_config, load_config

    out = tmp_path / "run"
    config = load_config(None, [f"train.out_dir={out}", "train.mode=ntp", "train.steps=100000", "train.batch_size=1",
                                "data.seq_len=256", "model.hidden_size=16", "model.intermediate_size=32"])
    (tmp_path / "config.yaml").write_text(dump_config(config))
    argv = [sys.executable, "-m", "refine.cli", "train", str(tmp_path / "config.yaml"), "--local", "--no-progress"]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else "slow"
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)  # what `kill`, a scheduler or a container runtime sends
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGKILL)
    assert run.returncode == 130, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    trainer = torch.load(out / "checkpoints" / "latest" / "trainer.pt", weights_only=True)
    assert trainer["step"] == steps[-1] >= 1
    assert f"interrupted at step {steps[-1]} of train.steps=100000; resume with `refine train " in err
    assert "Traceback" not in err


def test_sigterm_before_a_runs_steps_exits_130_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import refine.loop as loop

    real = loop.prepare_model

    def sigterm_while_loading(*args, **kwargs):  # as a scheduler's `kill` during the start-up
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "prepare_model", sigterm_while_loading)
    handler = signal.getsignal(signal.SIGTERM)
    argv = ["train", "--local", "--no-progress", "--set", f"train.out_dir={tmp_path}", "--set", "train.mode=ntp",
            "--set", "train.steps=2", "--set", "demo=null"]
    assert main(argv) == 130
    assert "refine: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is handler


def test_resume_commands_carry_the_service_addresses_given_but_no_password(tmp_path):
    import argparse

    from refine.cli import main_job_resume_command, service_flags
    from refine.config import DEMO_DEFAULTS, load_config

    args = argparse.Namespace(config=None, set=["train.out_dir=runs/d"], local=False, ray_address="10.0.0.1:6380",
                              redis_url="redis://:hunter2@10.0.0.2:6379/0", resume=False)
    assert service_flags(args) == ["--ray-address", "10.0.0.1:6380", "--redis-url", "redis://:***@10.0.0.2:6379/0"]
    config = load_config(None, args.set, defaults=DEMO_DEFAULTS)
    command = main_job_resume_command(args, config)
    # A relative run directory is pinned after the user's own setting, which it overrides.
    assert command[:6] == ["refine", "train", "--set", "train.out_dir=runs/d", "--set",
                           f"train.out_dir={Path('runs/d').resolve()}"]
    assert command[6:] == [*service_flags(args), "--resume"]
    args.local = True
    assert main_job_resume_command(args, config)[-2:] == ["--local", "--resume"]


def test_version_is_the_installed_distributions(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"refine {importlib.metadata.version('refine-rl')}\n"


def test_a_resume_from_a_runs_config_continues_that_run_or_says_why_not(tmp_path, monkeypatch, capsys):
    """A relative train.out_dir in a run's config.yaml resolved against the working directory: --resume from another
    directory continued another run there with this one's settings, or trained a new run from step 0 in
    runs/x/runs/x; a moved run's absolute out_dir named its old place and started a new run there."""
    tiny = ["--local", "--no-progress", "--set", "demo=null", "--set", "train.mode=ntp", "--set", "model.hidden_size=32",
            "--set", "model.intermediate_size=64"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", *tiny, "--set", "train.steps=1", "--set", "train.out_dir=runs/x"]) == 0
    run = tmp_path / "a" / "runs" / "x"
    for where, config_file in ((tmp_path / "b", str(run / "config.yaml")), (run, "config.yaml")):
        monkeypatch.chdir(where)
        capsys.readouterr()
        assert main(["train", config_file, "--resume", *tiny, "--set", "train.steps=2"]) == 2
        err = capsys.readouterr().err
        assert err == (f"refine: error: --resume: {config_file} is the config of the run in '{run}', but its "
                       f"train.out_dir='runs/x' is '{where / 'runs' / 'x'}' from here: add --set train.out_dir={run} "
                       f"to continue the run in '{run}'\n")
        assert not (where / "runs").exists()
    assert main(["train", str(run / "config.yaml"), "--resume", *tiny, "--set", "train.steps=2", "--set",
                 f"train.out_dir={run}"]) == 0  # the remedy it names
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_reader_of_stdout_that_goes_away_ends_the_command_quietly(tmp_path):
    """`refine data inspect ... | head` ended with "refine: error: [Errno 32] Broken pipe" and exit code 2 (and, when
    the pipe broke in a print, a traceback): the reader took what it wanted."""
    save_model(build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                                vocab_size=50, intermediate_size=48)), tmp_path)
    command = [sys.executable, "-c", "import sys; from refine.launcher import main; sys.exit(main())", "model",
               "inspect", str(tmp_path)]
    reader_gone = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader_gone.stdout.close()
    assert (reader_gone.wait(timeout=120), reader_gone.stderr.read()) == (141, b"")
    read = subprocess.run(command, capture_output=True, timeout=120)
    assert read.returncode == 0 and json.loads(read.stdout)["model_type"] == "delta_net"


@pytest.mark.parametrize("command", [["score", "--task", "qasper", "--predictions", "{tmp}/qa\udce9.jsonl"],
                                     ["train", "--local", "--set", "train.out_dir={tmp}/run\udce9"]])
def test_an_argument_that_is_not_utf8_is_refused_before_any_work(tmp_path, capsys, command):
    """A file name in another encoding (here the byte 0xe9, as Python passes it on) failed only when the path was
    written into a UTF-8 file: after a whole evaluation, or after a fresh posttrain run had cleared the earlier run's
    checkpoints."""
    argv = [part.format(tmp=tmp_path) for part in command]
    assert main(argv) == 2
    shown = argv[-1].replace("\udce9", "\\xe9")
    assert capsys.readouterr().err == (f"refine: error: argument '{shown}' is not valid UTF-8 (a file name in another "
                                       f"encoding?): the run records its paths in UTF-8 files; rename it\n")
    assert list(tmp_path.iterdir()) == []


EXAMPLE_NAMES = {"demo.yaml", "midtrain.yaml", "posttrain.yaml", "service_tiny.yaml", "ttt.yaml"}


def test_configs_copies_the_shipped_examples_into_configs_and_each_loads(tmp_path, capsys, monkeypatch):
    """What a user of an installed package does before README's commands: the copies are the examples, and each is
    a valid run config (midtrain and posttrain start from fla's checkpoint, which README puts in checkpoints/)."""
    monkeypatch.chdir(tmp_path)
    save_model(build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                                vocab_size=260)), tmp_path / "checkpoints" / "delta_net-1.3B-100B")
    assert main(["configs"]) == 0
    written = capsys.readouterr().out.splitlines()
    assert sorted(written) == sorted(f"configs/{name}" for name in EXAMPLE_NAMES)
    for name in EXAMPLE_NAMES:
        assert (tmp_path / "configs" / name).read_bytes() == (REPO / "configs" / name).read_bytes()
        load_config(f"configs/{name}", [f"train.out_dir={tmp_path / 'runs'}"])


def test_configs_refuses_to_overwrite_naming_the_file_unless_forced(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "ttt.yaml").write_text("optim:\n  lr: 0.5\n")  # the user's own edits
    assert main(["configs", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refine: error: {mine / 'ttt.yaml'} exists") and "--force" in err and err.count("\n") == 1
    assert [path.name for path in mine.iterdir()] == ["ttt.yaml"]  # refused before anything was written
    assert (mine / "ttt.yaml").read_text() == "optim:\n  lr: 0.5\n"
    assert main(["configs", str(mine), "--force"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(EXAMPLE_NAMES)
    assert (mine / "ttt.yaml").read_bytes() == (REPO / "configs" / "ttt.yaml").read_bytes()


def test_configs_names_every_file_it_refuses_to_overwrite(tmp_path, capsys):
    """Only the first was named: a user moved it away and was refused again for the next."""
    mine = tmp_path / "mine"
    mine.mkdir()
    edited = sorted(EXAMPLE_NAMES)[:2]
    for name in edited:
        (mine / name).write_text("# mine\n")
    assert main(["configs", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refine: error: {mine / edited[0]}, {mine / edited[1]} exist: ") and err.count("\n") == 1
    assert sorted(path.name for path in mine.iterdir()) == edited


def test_configs_refuses_an_empty_name_a_file_and_a_folder_where_an_example_goes(tmp_path, capsys, monkeypatch):
    """`refine configs "$DIR"` with DIR unset wrote into the working directory; a file or a link to nothing given
    as the directory, or a folder named like an example, failed with a bare "[Errno 17] File exists"."""
    monkeypatch.chdir(tmp_path)
    assert main(["configs", ""]) == 2
    assert "the directory is empty ('')" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for name in ("notes.txt", "gone"):
        assert main(["configs", name]) == 2
        assert capsys.readouterr().err == (f"refine: error: {name} is not a directory (a file, or a link to nothing): "
                                           f"give a directory to write the examples into\n")
    (tmp_path / "mine" / "demo.yaml").mkdir(parents=True)
    assert main(["configs", "mine", "--force"]) == 2
    assert "mine/demo.yaml is a directory" in capsys.readouterr().err
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["demo.yaml"]  # nothing written


def test_configs_into_a_checkouts_own_configs_leaves_the_shipped_files_alone(capsys):
    """A checkout's configs/ is the package's folder: even --force writes nothing there (it would empty them)."""
    before = {path.name: path.read_bytes() for path in (REPO / "configs").iterdir()}
    assert main(["configs", str(REPO / "configs"), "--force"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.count("is the shipped example itself") == len(EXAMPLE_NAMES)
    assert {path.name: path.read_bytes() for path in (REPO / "configs").iterdir()} == before
