"""Checkpoint directories move between flash-linear-attention's classes (and the LaCT release's layout)
and ours without conversion."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from refine.models import build_model, load_model, save_model


def _fla():
    # Only the fla comparisons need fla; the LaCT layout test below writes the release's files itself.
    return pytest.importorskip("fla.models", reason="flash-linear-attention is a dev dependency")

CASES = [
    ("delta_net", dict(use_short_conv=True, use_gate=False)),
    ("delta_net", dict(use_short_conv=False, use_gate=True)),
    ("delta_net", dict(use_short_conv=True, use_gate=True, tie_word_embeddings=True)),
    ("gated_deltanet", dict(use_short_conv=True, use_gate=True, head_dim=16)),
    ("gated_deltanet", dict(use_short_conv=False, use_gate=False, head_dim=16)),
    ("gated_deltanet", dict(use_short_conv=True, use_gate=True, head_dim=16, num_v_heads=4)),
    ("gated_deltanet", dict(use_short_conv=True, use_gate=True, head_dim=16, output_gate_activation="silu")),
    ("gated_deltanet", dict(use_short_conv=True, use_gate=True, head_dim=16, output_gate_activation="sigmoid")),
]


def _fla_model(model_type, overrides):
    fla_models = _fla()
    common = dict(hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=60, intermediate_size=48)
    if model_type == "delta_net":
        return fla_models.DeltaNetForCausalLM(fla_models.DeltaNetConfig(**common, **overrides))
    return fla_models.GatedDeltaNetForCausalLM(fla_models.GatedDeltaNetConfig(**common, **overrides))


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_fla_checkpoint_loads_with_every_key(tmp_path, model_type, overrides):
    torch.manual_seed(0)
    reference = _fla_model(model_type, overrides)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, msg=name)
    for key, value in overrides.items():
        assert getattr(ours.config, key) == value, key


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_our_checkpoint_loads_into_fla(tmp_path, model_type, overrides):
    fla_models = _fla()
    torch.manual_seed(1)
    config = dict(model_type=model_type, hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=60,
                  intermediate_size=48, **overrides)
    ours = build_model(config)
    save_model(ours, tmp_path)
    cls = fla_models.DeltaNetForCausalLM if model_type == "delta_net" else fla_models.GatedDeltaNetForCausalLM
    theirs, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[name], tensor, msg=name)
    for key, value in overrides.items():
        assert getattr(theirs.config, key) == value, key
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type


# The LaCT release's config.json (760M layout, tiny sizes) as transformers writes it: the release's keys,
# attention_bias included, plus transformers' bookkeeping.
LACT_RELEASE_CONFIG = {
    "architectures": ["LaCTForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "fuse_cross_entropy": True, "fuse_norm": True, "hidden_act": "swish", "hidden_size": 16, "num_attn_heads": 4,
    "num_hidden_layers": 2, "initializer_range": 0.02, "max_position_embeddings": 32768,
    "model_type": "lact_swiglu", "num_lact_heads": 2, "inter_multi": 2, "qkv_bias": False, "attn_qk_norm": False,
    "qkv_silu": True, "lact_chunk_size": 4, "window_size": 4, "use_muon": True, "lr_dim": 1,
    "lr_parameterization": "mamba", "learnable_ttt_scale": True, "w0_w2_low_rank": 3, "fw_init_gain": 0.5,
    "use_momentum": True, "rope_theta": 1000000, "norm_eps": 1e-06, "tie_word_embeddings": False,
    "use_cache": True, "vocab_size": 40, "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
}
LACT_VARIANTS = {
    "low_rank_momentum": {},
    # every optional parameter the other way round
    "full_rank_qk_norm_bias": dict(w0_w2_low_rank=-1, inter_multi=1, lr_dim=8, attn_qk_norm=True, qkv_bias=True,
                                   use_momentum=False, learnable_ttt_scale=False, ttt_prenorm=True),
}


def _lact_release_layout(config: dict) -> dict[str, tuple[int, ...]]:
    """The release's LaCTForCausalLM parameter names and shapes, written out from its modules."""
    d, vocab, heads = config["hidden_size"], config["vocab_size"], config["num_lact_heads"]
    rank = config["w0_w2_low_rank"]
    fw = d // heads
    inner = int(fw * config["inter_multi"])
    lrs = 3 * heads * config["lr_dim"]
    mlp = 256  # fla's GatedMLP with hidden_ratio 4: int(4 * d * 2 / 3) rounded up to a multiple of 256
    layer = {
        "attn_norm.weight": (d,), "mlp_norm.weight": (d,), "attn.qkv.weight": (3 * d, d), "attn.o_proj.weight": (d, d),
        "attn.w1": (heads, fw, inner), "attn.lr_proj.weight": (lrs, d), "attn.lr_proj.bias": (lrs,),
        "attn.qk_scale": (d, 2), "attn.qk_offset": (d, 2), "attn.ttt_norm.weight": (fw,),
        "mlp.gate_proj.weight": (mlp, d), "mlp.up_proj.weight": (mlp, d), "mlp.down_proj.weight": (d, mlp),
    }
    for w in ("w0", "w2"):
        if rank > 0:
            layer.update({f"attn.{w}.w_left": (heads, inner, rank), f"attn.{w}.w_right": (heads, rank, fw)})
        else:
            layer[f"attn.{w}"] = (heads, inner, fw)
    if config["qkv_bias"]:
        layer["attn.qkv.bias"] = (3 * d,)
    if config["attn_qk_norm"]:
        layer.update({"attn.q_norm.weight": (d,), "attn.k_norm.weight": (d,)})
    if config["learnable_ttt_scale"]:
        layer.update({"attn.ttt_scale_proj.weight": (heads, d), "attn.ttt_scale_proj.bias": (heads,)})
    if config["use_momentum"]:
        layer.update({"attn.momentum_proj.0.weight": (heads, d), "attn.momentum_proj.0.bias": (heads,)})
    names = {"model.embeddings.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        names.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return names


@pytest.mark.parametrize("variant", sorted(LACT_VARIANTS))
def test_lact_release_checkpoint_loads_and_saves_in_the_release_layout(tmp_path, variant):
    config = {**LACT_RELEASE_CONFIG, **LACT_VARIANTS[variant]}
    layout = _lact_release_layout(config)
    gen = torch.Generator().manual_seed(4)
    tensors = {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in layout.items()}
    release = tmp_path / "release"
    release.mkdir()
    (release / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(release / "model.safetensors"), metadata={"format": "pt"})

    model = load_model(release)
    assert type(model).__name__ == "LaCTForCausalLM" and model.dtype == torch.bfloat16
    loaded = model.state_dict()
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(10)[None] % 40).logits).all()

    ours = save_model(model, tmp_path / "ours")
    written = load_file(ours / "model.safetensors")
    assert {name: tuple(t.shape) for name, t in written.items()} == layout
    for name, tensor in tensors.items():
        assert torch.equal(written[name], tensor), name
    saved = json.loads((ours / "config.json").read_text())
    for key, value in config.items():  # the release's fields and transformers' bookkeeping, unchanged
        assert key in saved and saved[key] == value, (key, saved.get(key), value)
    assert "num_heads" not in saved  # our alias of num_attn_heads; the release has no such field
    reloaded = load_model(ours).state_dict()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in tensors.items())


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet", "lact_swiglu"])
def test_the_pad_token_is_the_embeddings_padding_row_as_in_fla(model_type):
    """fla's models (and the LaCT release) build nn.Embedding(padding_idx=pad_token_id): a lookup of the pad token
    passes no gradient to its row. Ours passed one (the LaCT review: 1.16e-2 against 0 for pad_token_id=0)."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=1, vocab_size=60, pad_token_id=0, tie_word_embeddings=False)
    if model_type == "lact_swiglu":
        sizes |= dict(num_attn_heads=2, num_lact_heads=2, lact_chunk_size=8, window_size=8)
    else:
        sizes |= dict(num_heads=2, intermediate_size=48)
    model = build_model(dict(model_type=model_type, **sizes))
    if model_type != "lact_swiglu":
        fla_embeddings = _fla_model(model_type, {"pad_token_id": 0}).model.embeddings
        assert model.model.embeddings.padding_idx == fla_embeddings.padding_idx == 0
    ids = torch.tensor([[5, 0, 7, 0, 9, 11, 0, 3]])  # the pad id inside the text too
    model(ids).logits.square().mean().backward()
    grad = model.model.embeddings.weight.grad
    assert torch.count_nonzero(grad[0]) == 0 and all(torch.count_nonzero(grad[i]) > 0 for i in (3, 5, 7, 9, 11))
    assert torch.count_nonzero(model.model.embeddings.weight[0]) > 0  # initialized like every row, as fla does


def test_a_pad_token_outside_the_vocabulary_is_refused_by_name():
    with pytest.raises(ValueError, match=r"pad_token_id=60 is outside the vocabulary \(vocab_size=60\)"):
        build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=60,
                         pad_token_id=60))


def test_fla_checkpoint_with_attention_residuals_is_refused_by_name(tmp_path):
    _fla_model("delta_net", dict(attnres_block_size=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attnres_block_size=2 is not supported"):
        load_model(tmp_path)


def _perturbed_float64_model() -> torch.nn.Module:
    torch.manual_seed(2)
    model = build_model(dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16,
                             num_hidden_layers=1, vocab_size=60, intermediate_size=48), dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # values that float32 cannot hold
    return model


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_float64_checkpoint_loads_bit_exactly(tmp_path, dtype):
    model = _perturbed_float64_model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype=dtype)
    assert loaded.dtype == torch.float64
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoint_loads_in_its_own_dtype_or_the_requested_one(tmp_path):
    model = _perturbed_float64_model().to(torch.bfloat16)
    save_model(model, tmp_path)
    assert load_model(tmp_path).dtype == torch.bfloat16
    widened = load_model(tmp_path, dtype=torch.float32)
    assert widened.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(widened.state_dict()[name], tensor.float()), name
    # Saved again, its config.json tells other libraries (torch_dtype="auto") the dtype its tensors have now.
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    save_model(widened, tmp_path / "widened")
    assert json.loads((tmp_path / "widened" / "config.json").read_text())["torch_dtype"] == "float32"
    assert {t.dtype for t in load_file(tmp_path / "widened" / "model.safetensors").values()} == {torch.float32}


def test_mixed_dtype_checkpoint_loads_in_the_widest(tmp_path):
    model = _perturbed_float64_model()
    save_model(model, tmp_path)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(tmp_path / "model.safetensors").items()}
    tensors["model.layers.0.attn.A_log"] = model.state_dict()["model.layers.0.attn.A_log"].float()
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.dtype == torch.float32
    for name, tensor in tensors.items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    ours = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=60))
    save_model(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing=.*model.layers.1"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
@pytest.mark.parametrize("every_tensor", [True, False])
def test_integer_weights_are_refused_not_cast(tmp_path, dtype, every_tensor):
    """A quantized checkpoint's integer weights would load as floats of their raw values (without their scales);
    with every tensor integer, as an all-zero model."""
    save_model(build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                                vocab_size=60)), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    names = sorted(tensors) if every_tensor else ["model.layers.0.attn.q_proj.weight"]
    save_file({k: v.to(dtype) if k in names else v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    shown = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"holds {len(names)} non-floating tensors .* e.g. {names[0]} \({shown}\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_are_refused_naming_the_tensor(tmp_path, dtype):
    """A float8 checkpoint passed the integer check and failed in the NaN/Inf scan: a raw NotImplementedError
    ("isfinite" not implemented for 'Float8_e4m3fn') from every command that loads a model."""
    save_model(build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                                vocab_size=60)), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in tensors.items()}, tmp_path / "model.safetensors")
    shown = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '.*' is {shown}: a quantized checkpoint loads "
                                         rf"only dequantized"):
        load_model(tmp_path)


def test_bad_config_value_names_field():
    with pytest.raises(ValueError, match="num_heads"):
        build_model(dict(model_type="delta_net", hidden_size=30, num_heads=4, num_hidden_layers=1, vocab_size=10))
    with pytest.raises(ValueError, match="model_type='mamba'"):
        build_model(dict(model_type="mamba"))


def _tiny_checkpoint(path):
    return save_model(build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                                       vocab_size=60)), path)


def _write_config(path, values):
    (path / "config.json").write_text(json.dumps(values))


def _shard(path):
    """The same weights as one shard named by model.safetensors.index.json."""
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    names = load_file(path / "model-00001-of-00001.safetensors")
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {name: "model-00001-of-00001.safetensors" for name in names}}))


def _replace_dir(file):
    file.unlink()
    file.mkdir()


DAMAGES = {  # damage -> (file the error names, what it says)
    "config not json": (lambda p: (p / "config.json").write_text("{bad"), "config.json", "not valid JSON"),
    "config not utf-8": (lambda p: (p / "config.json").write_bytes(b'{"a": "\xff"}'), "config.json",
                         "not valid JSON"),
    "config a list": (lambda p: (p / "config.json").write_text("[1]"), "config.json",
                      "holds a list, not a mapping"),
    "config bad values": (
        lambda p: _write_config(p, json.loads((p / "config.json").read_text()) | {"hidden_size": "abc",
                                                                                   "num_heads": 0}),
        "config.json", "hidden_size: Input should be a valid integer, unable to parse string as an integer "
                       "(got 'abc'); num_heads: Input should be greater than 0 (got 0)"),
    "config model_type a list": (lambda p: _write_config(p, {"model_type": [1]}), "config.json",
                                 "model_type=[1] is not supported"),
    "config a directory": (lambda p: _replace_dir(p / "config.json"), "config.json", "is not a file"),
    "weights garbage": (lambda p: (p / "model.safetensors").write_bytes(b"\x01" * 200), "model.safetensors",
                        "not a readable safetensors file"),
    "weights truncated": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:999]),
                          "model.safetensors", "not a readable safetensors file"),
    "weights a directory": (lambda p: _replace_dir(p / "model.safetensors"), "model.safetensors", "is not a file"),
    "index without weight_map": (lambda p: (_shard(p), (p / "model.safetensors.index.json").write_text("{}")),
                                 "model.safetensors.index.json", "has no weight_map"),
    "index naming a missing shard": (lambda p: (_shard(p), (p / "model-00001-of-00001.safetensors").unlink()),
                                     "model.safetensors.index.json", "names 'model-00001-of-00001.safetensors'"),
}


@pytest.mark.parametrize("damage,named,says", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_model_directory_is_one_line_naming_the_file(tmp_path, damage, named, says):
    damage(_tiny_checkpoint(tmp_path))
    with pytest.raises(ValueError) as failure:
        load_model(tmp_path)
    message = str(failure.value)
    assert message.startswith(str(tmp_path / named)) and says in message and "\n" not in message, message
    assert "https://" not in message and failure.value.__cause__ is None


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_file_and_the_tensor(tmp_path, sharded, bad):
    _tiny_checkpoint(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"][3] = bad
    tensors["model.layers.0.attn.q_proj.weight"][0, 0] = bad
    save_file(tensors, tmp_path / "model.safetensors")
    if sharded:
        _shard(tmp_path)
    file = tmp_path / ("model-00001-of-00001.safetensors" if sharded else "model.safetensors")
    with pytest.raises(ValueError, match=f"^{file}: tensor 'model.layers.0.attn.q_proj.weight' holds NaN or Inf"):
        load_model(tmp_path)


def test_a_sharded_checkpoint_loads(tmp_path):
    model = _tiny_checkpoint(tmp_path)
    expected = load_file(model / "model.safetensors")
    _shard(tmp_path)
    loaded = load_model(tmp_path).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def test_save_model_puts_its_files_on_disk(tmp_path, monkeypatch):
    """A model directory outlives a machine crash, not only a killed process: its files and the directory
    itself are fsynced before save_model returns."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    model = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                             vocab_size=60, intermediate_size=48))
    path = save_model(model, tmp_path / "model")
    assert {path / "config.json", path / "model.safetensors", path} <= set(synced)
    assert synced.index(path) > max(synced.index(path / "config.json"), synced.index(path / "model.safetensors"))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_weights_follow_the_umask_as_the_other_files_do(tmp_path, umask):
    """safetensors writes its file 0600 whatever the umask: a teammate who could read a checkpoint's config.json
    and trainer state could not read its weights."""
    model = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                             vocab_size=60, intermediate_size=48))
    previous = os.umask(umask)
    try:
        path = save_model(model, tmp_path / "model")
    finally:
        os.umask(previous)
    modes = {name: os.stat(path / name).st_mode & 0o777 for name in ("config.json", "model.safetensors")}
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


def test_a_tied_config_whose_checkpoint_stores_its_own_output_layer_is_refused(tmp_path):
    # fla keeps such a file's lm_head (untied); dropping it would train and save another model, silently.
    model = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=60,
                             tie_word_embeddings=False))
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"tie_word_embeddings=true, but the checkpoint's lm_head.weight differs from "
                                         r"its model.embeddings.weight"):
        load_model(tmp_path)
    # A stored copy of the embeddings is what tying means: it loads.
    tensors = load_file(tmp_path / "model.safetensors")
    # A copy: safetensors before 0.8 maps the file it loads, and the save below rewrites that file.
    embeddings = tensors["model.embeddings.weight"].clone()
    tensors["lm_head.weight"] = embeddings.clone()
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.lm_head.weight, embeddings)


def test_a_dtype_given_by_name_is_refused_naming_the_argument(tmp_path):
    """dtype="bfloat16" failed inside torch.promote_types with a TypeError naming no argument."""
    config = dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=60)
    save_model(build_model(config), tmp_path)
    for call in (lambda: build_model(config, dtype="bfloat16"), lambda: load_model(tmp_path, dtype="bfloat16")):
        with pytest.raises(ValueError, match=r"dtype must be a torch.dtype \(torch.bfloat16, say\), got 'bfloat16'"):
            call()
