"""A model's size from its config, and the refusal of a model that cannot fit before anything is allocated."""

import json

import pytest
import torch

from refine.cli import main
from refine.models import build_model, config_from_dict, load_model, save_model
from refine.models.size import TRAINING_COPIES, check_model_fits, count_parameters
from refine.tokenizer import ByteTokenizer

CONFIGS = {
    "delta_net": dict(model_type="delta_net", hidden_size=32, num_heads=2, vocab_size=50, intermediate_size=48),
    "delta_net_tied_noconv": dict(model_type="delta_net", hidden_size=32, num_heads=2, vocab_size=50,
                                  tie_word_embeddings=True, use_short_conv=False, use_gate=True),
    "gated_deltanet": dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16, vocab_size=50,
                           num_v_heads=4, intermediate_size=48),
    "lact": dict(model_type="lact_swiglu", hidden_size=32, num_attn_heads=2, num_lact_heads=2, vocab_size=50,
                 lact_chunk_size=8, window_size=8, w0_w2_low_rank=4, use_momentum=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("layers", [1, 2, 5])
def test_count_parameters_equals_a_built_models_count(name, layers):
    config = config_from_dict({**CONFIGS[name], "num_hidden_layers": layers})
    model = build_model(config)
    assert count_parameters(config) == sum(parameter.numel() for parameter in model.parameters())


def test_the_count_of_a_very_deep_or_wide_model_allocates_nothing():
    config = config_from_dict({**CONFIGS["delta_net"], "num_hidden_layers": 10**6, "vocab_size": 10**9})
    one_layer = count_parameters(config.model_copy(update={"num_hidden_layers": 1}))
    two_layers = count_parameters(config.model_copy(update={"num_hidden_layers": 2}))
    assert count_parameters(config) == one_layer + (10**6 - 1) * (two_layers - one_layer)
    assert one_layer > 2 * 10**9 * 32  # embedding and output head of 10**9 x 32 each


def _memory(monkeypatch, total_bytes):
    monkeypatch.setattr("refine.models.size.device_memory_bytes", lambda device: total_bytes)


def test_training_needs_room_for_gradients_and_both_adamw_moments(monkeypatch):
    config = config_from_dict({**CONFIGS["delta_net"], "num_hidden_layers": 2})
    weights = count_parameters(config) * 4  # float32
    _memory(monkeypatch, weights * TRAINING_COPIES)
    check_model_fits(config, torch.float32, "cpu", training=True)
    _memory(monkeypatch, weights * TRAINING_COPIES - 1)
    with pytest.raises(ValueError, match="weights, their gradients and AdamW's two moments in float32"):
        check_model_fits(config, torch.float32, "cpu", training=True)
    check_model_fits(config, torch.float32, "cpu", training=False)  # the weights alone still fit
    check_model_fits(config, torch.bfloat16, "cpu", training=True)  # half the bytes per parameter
    _memory(monkeypatch, weights - 1)
    with pytest.raises(ValueError, match="for its weights in float32"):
        check_model_fits(config, torch.float32, "cpu", training=False)


def test_the_refusal_names_the_size_fields_and_the_device(monkeypatch):
    config = config_from_dict({**CONFIGS["gated_deltanet"], "num_hidden_layers": 3})
    _memory(monkeypatch, 1000)
    with pytest.raises(ValueError) as refusal:
        check_model_fits(config, torch.float32, "cpu", training=True)
    message = str(refusal.value)
    for field in ("model.vocab_size=50", "model.hidden_size=32", "model.num_hidden_layers=3", "model.head_dim=16",
                  "model.num_v_heads=4"):
        assert field in message
    assert f"a model of {count_parameters(config):,} parameters" in message and "'cpu'" in message
    with pytest.raises(ValueError, match=r"^/x/config.json: vocab_size=50, hidden_size=32"):
        check_model_fits(config, torch.float32, "cpu", training=False, config_file="/x/config.json")


def test_a_lact_low_rank_too_large_is_named_in_the_refusal(monkeypatch):
    config = config_from_dict(dict(model_type="lact_swiglu", hidden_size=32, num_attn_heads=2, num_lact_heads=2,
                                   num_hidden_layers=1, vocab_size=50, lact_chunk_size=8, window_size=8,
                                   w0_w2_low_rank=10**9))
    _memory(monkeypatch, 10**9)
    with pytest.raises(ValueError, match="model.w0_w2_low_rank=1000000000"):
        check_model_fits(config, torch.float32, "cpu", training=True)


def test_a_run_of_a_model_too_large_for_this_machine_stops_before_building_it(tmp_path, capsys):
    """A million layers would allocate until the out-of-memory killer ends the process; the run is refused at
    once, naming the field, and leaves no run directory."""
    out_dir = tmp_path / "run"
    argv = ["train", "--local", "--set", "demo=null", "--set", "model.num_hidden_layers=1000000",
            "--set", f"train.out_dir={out_dir}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refine: error: model.vocab_size=") and "model.num_hidden_layers=1000000" in err
    assert "more than the" in err and "Traceback" not in err
    assert not out_dir.exists()


def test_a_checkpoint_whose_config_is_too_large_is_refused_naming_its_file(tmp_path, capsys):
    tokenizer = ByteTokenizer()  # the run's tokenizer: its ids are the checkpoint's
    save_model(build_model({**CONFIGS["delta_net"], "num_hidden_layers": 1, "vocab_size": tokenizer.vocab_size,
                            "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}), tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "vocab_size": 10**12}))  # its tensors stay small
    with pytest.raises(ValueError, match=rf"^{config_file}: vocab_size=1000000000000, hidden_size=32"):
        load_model(tmp_path)
    argv = ["train", "--local", "--set", "demo=null", "--set", f"train.init_from={tmp_path}",
            "--set", f"train.out_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    assert f"{config_file}: vocab_size=1000000000000" in capsys.readouterr().err


@pytest.mark.parametrize("size", [10**12, 10**20])
def test_sizes_torch_cannot_describe_are_refused_naming_the_fields(tmp_path, capsys, size):
    # Past 2**63 elements (or past int64 itself) even the meta device cannot make the tensors.
    argv = ["train", "--local", "--set", "demo=null", "--set", f"model.hidden_size={size}",
            "--set", f"train.out_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refine: error: model.vocab_size=") and f"model.hidden_size={size}" in err
    assert "cannot be built even without memory" in err and "Traceback" not in err and "frame #" not in err
    assert not (tmp_path / "run").exists()
