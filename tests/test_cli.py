"""The `refine` command line: model inspection and clear errors."""

import json

import torch

from refine.cli import main
from refine.models import build_model, save_model


def test_model_inspect_reports_architecture_parameters_and_state(tmp_path, capsys):
    model = build_model(dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16,
                             num_hidden_layers=2, vocab_size=50, intermediate_size=48))
    save_model(model, tmp_path)
    assert main(["model", "inspect", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "gated_deltanet"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    # Per layer: recurrent state H x K x V = 2 x 16 x 32, three conv caches (conv_size - 1) x dim.
    per_layer = 2 * 16 * 32 + 3 * (32 + 32 + 64)
    assert info["recurrent_state_elements_per_sequence"] == 2 * per_layer
    assert info["recurrent_state_bytes_per_sequence"] == 2 * per_layer * torch.float32.itemsize


def test_errors_exit_2_with_the_field(tmp_path, capsys):
    assert main(["train", "--local", "--set", "refine.num_chunks=0", "--set", "demo=null"]) == 2
    assert "refine.num_chunks" in capsys.readouterr().err
    assert main(["model", "inspect", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_an_unreachable_redis_is_one_line_naming_the_url(tmp_path, capsys):
    """A service run told to use a Redis nobody answers at stops before starting Ray, without a traceback."""
    url = "redis://127.0.0.1:1/0"  # port 1: nothing listens there
    argv = ["train", "--set", "demo=null", "--set", f"train.out_dir={tmp_path}", "--redis-url", url]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refine: error:") and url in err and "Traceback" not in err
