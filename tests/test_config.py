"""Config files, overrides and error messages that name the field and the value."""

import pytest

from refine.config import ConfigError, dump_config, load_config


def test_defaults_are_the_paper_defaults():
    config = load_config()
    r = config.refine
    assert (r.rollout_len, r.num_chunks, r.num_samples, r.temperature) == (5, 8, 1, 1.0)
    assert (r.lambda_ntp, r.lambda_nsp, r.reward) == (1.0, 0.2, "cosine")
    assert (config.optim.lr, config.optim.weight_decay, config.optim.grad_clip) == (1e-6, 0.01, 1.0)
    assert config.model.model_type == "delta_net"


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  model_type: gated_deltanet\n  hidden_size: 64\n  num_heads: 2\n  head_dim: 32\n"
                    "refine:\n  num_samples: 4\n")
    config = load_config(path, ["model.hidden_size=128", "refine.reward=hybrid", "train.mode=onepass"])
    assert config.model.model_type == "gated_deltanet"
    assert config.model.hidden_size == 128 and config.model.head_dim == 32
    assert config.refine.num_samples == 4 and config.refine.reward == "hybrid"
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_stream_takeover_waits_out_the_orchestrators_restart():
    # A live consumer takes a silent one's entries over only after the orchestrator, which acts after
    # one heartbeat timeout, had its chance to replace it and release them (no race for the batch).
    service = load_config(None, ["service.heartbeat_timeout_s=3"]).service
    assert service.reclaim_idle_ms == 6000
    assert "reclaim_idle_ms" not in dump_config(load_config())  # derived, not a setting


@pytest.mark.parametrize("override,field,value", [
    ("refine.num_chunks=0", "refine.num_chunks", "0"),
    ("train.mode=turbo", "train.mode", "turbo"),
    ("model.hidden_size=abc", "model", "abc"),
    ("train.device=tpu", "train.device", "tpu"),
    ("optim.lr=-1", "optim.lr", "-1"),
    ("refine.unknown=1", "refine.unknown", "1"),
    ("service.heartbeat_timeout_s=1", "service.heartbeat_timeout_s", "1"),
])
def test_wrong_values_name_field_and_value(override, field, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert field in message and value in message


def test_too_short_documents_for_the_chunks_are_refused():
    with pytest.raises(ConfigError, match="data.seq_len=40"):
        load_config(None, ["data.seq_len=40"])


def test_a_minimum_document_length_below_what_rollouts_need_is_refused():
    # margin 40 and k = 5 need documents of 80 tokens; the default data.min_length of 64 would let
    # shorter ones through to the rollout workers, which would fail on them.
    with pytest.raises(ConfigError, match="data.min_length=64 .*margin=40 .*>= 80 tokens"):
        load_config(None, ["refine.margin=40"])
    assert load_config(None, ["refine.margin=40", "data.min_length=80"]).data.min_length == 80
    assert load_config(None, ["refine.margin=40", "train.mode=ntp"]).train.mode == "ntp"  # no rollouts


def test_grpo_groups_follow_the_paper_code_unless_set():
    # The paper's code groups a document's c rollouts when n = 1 and each position's n samples when n > 1.
    assert load_config().refine.groups == "document"
    assert load_config(None, ["refine.num_samples=4"]).refine.groups == "position"
    assert load_config(None, ["refine.num_samples=4", "refine.group_by=document"]).refine.groups == "document"
    with pytest.raises(ConfigError, match="group_by='position' with num_samples=1"):
        load_config(None, ["refine.group_by=position"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["refine.num_chunks"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_demo_file_spells_out_the_embedded_main_job():
    from pathlib import Path

    from refine.config import DEMO_DEFAULTS

    demo_file = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert load_config(demo_file) == load_config(None, defaults=DEMO_DEFAULTS)


def test_a_run_from_a_checkpoint_takes_its_model_section(tmp_path):
    import torch

    from refine.models import build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(dict(model_type="gated_deltanet", vocab_size=300, hidden_size=32, num_heads=2,
                                num_hidden_layers=1, head_dim=16)), tmp_path / "ckpt")
    config = load_config(None, [f"train.init_from={tmp_path / 'ckpt'}", "model.vocab_size=260"])
    assert (config.model.model_type, config.model.vocab_size, config.model.hidden_size) == ("gated_deltanet", 300, 32)
    assert load_config(None, [f"train.init_from={tmp_path / 'ckpt'}"]).model == config.model
    with pytest.raises(ConfigError, match=r"train\.init_from='.*nowhere' does not exist"):
        load_config(None, [f"train.init_from={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"\n  train\.init_from='.*' has no config\.json: give a model directory"):
        load_config(None, [f"train.init_from={tmp_path}"])  # the message alone, without pydantic's wrapping


def test_the_model_agrees_with_the_tokenizer(tmp_path):
    import torch

    from refine.config import fit_to_tokenizer
    from refine.models import build_model, save_model
    from refine.tokenizer import ByteTokenizer

    byte = ByteTokenizer()
    # From scratch: the model takes the tokenizer's special ids (gated_deltanet's own defaults are 1 and 2).
    scratch = fit_to_tokenizer(load_config(None, ["model.model_type=gated_deltanet"]), byte)
    assert (scratch.model.bos_token_id, scratch.model.eos_token_id, scratch.model.pad_token_id) == (
        byte.bos_id, byte.eos_id, byte.pad_id)
    with pytest.raises(ValueError, match=r"model\.vocab_size=200 is smaller than the vocabulary of tokenizer "
                                         r"'byte-level' \(260\)"):
        fit_to_tokenizer(load_config(None, ["model.vocab_size=200"]), byte)
    # From a checkpoint: its EOS must be the tokenizer's.
    torch.manual_seed(0)
    save_model(build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=32, num_heads=2,
                                num_hidden_layers=1, eos_token_id=2)), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"has eos_token_id=2 but tokenizer 'byte-level' ends documents with id 258"):
        fit_to_tokenizer(load_config(None, [f"train.init_from={tmp_path / 'ckpt'}"]), byte)


def test_the_vllm_engine_refuses_a_sigmoid_output_gate():
    sets = ["model.model_type=gated_deltanet", "rollout.engine=vllm"]
    assert load_config(None, sets + ["model.output_gate_activation=silu"]).model.output_gate_activation == "silu"
    with pytest.raises(ConfigError, match="not model.output_gate_activation='sigmoid'"):
        load_config(None, sets + ["model.output_gate_activation=sigmoid"])


def test_home_relative_paths_are_expanded_once_for_every_reader(tmp_path, monkeypatch):
    import torch

    from refine.models import build_model, save_model

    monkeypatch.setenv("HOME", str(tmp_path))
    torch.manual_seed(0)
    save_model(build_model(dict(model_type="delta_net", vocab_size=300, hidden_size=32, num_heads=2,
                                num_hidden_layers=1)), tmp_path / "ckpt")
    config = load_config(None, ["train.init_from=~/ckpt", "train.out_dir=~/runs/x", "tokenizer=~/ckpt"])
    assert (config.train.init_from, config.tokenizer) == (str(tmp_path / "ckpt"),) * 2
    assert config.train.out_dir == str(tmp_path / "runs" / "x") and config.model.vocab_size == 300
