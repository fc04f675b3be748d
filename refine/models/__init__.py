"""Models: build from a config, load and save checkpoint directories (config.json + safetensors).

A directory written by flash-linear-attention (or the LaCT release) loads without conversion and a
directory we write loads back into their classes: same config fields, same parameter names.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from refine.errors import validation_problems
from refine.files import sync_tree
from refine.models.base import FastWeightLM, ModelOutput
from refine.models.config import ModelConfigBase
from refine.models.size import check_model_fits
from refine.models.state import ModelState

# model_type -> (module, model class, config class, class name the original library uses)
MODEL_TYPES: dict[str, tuple[str, str, str, str]] = {
    "delta_net": ("refine.models.delta_net", "DeltaNetForCausalLM", "DeltaNetConfig", "DeltaNetForCausalLM"),
    "gated_deltanet": (
        "refine.models.gated_deltanet", "GatedDeltaNetForCausalLM", "GatedDeltaNetConfig", "GatedDeltaNetForCausalLM",
    ),
    "lact_swiglu": ("refine.models.lact", "LaCTForCausalLM", "LaCTConfig", "LaCTForCausalLM"),
}
EMBEDDINGS_KEY = "model.embeddings.weight"  # every model's input embeddings (FastWeightLM), which lm_head may share

__all__ = [
    "FastWeightLM", "ModelOutput", "ModelState", "MODEL_TYPES",
    "config_from_dict", "build_model", "load_model", "load_model_config", "save_model", "inspect_model",
]


def _lookup(model_type: str) -> tuple[type[FastWeightLM], type[ModelConfigBase], str]:
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; choose one of {sorted(MODEL_TYPES)}")
    module_name, model_cls, config_cls, original_name = MODEL_TYPES[model_type]
    module = importlib.import_module(module_name)
    config_module = importlib.import_module("refine.models.config")
    config_class = getattr(module, config_cls, None) or getattr(config_module, config_cls)
    return getattr(module, model_cls), config_class, original_name


def config_from_dict(values: dict[str, Any]) -> ModelConfigBase:
    model_type = values.get("model_type")
    if model_type is None:
        raise ValueError("model config has no 'model_type' field")
    _, config_class, _ = _lookup(model_type)
    return config_class.model_validate(values)


def _check_dtype(dtype: object) -> None:
    """A library caller's dtype="bfloat16" failed inside torch.promote_types, naming no argument."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype (torch.bfloat16, say), got {dtype!r}")


def build_model(config: ModelConfigBase | dict[str, Any], dtype: torch.dtype | None = None,
                config_file: str | None = None) -> FastWeightLM:
    """A new model of `config` with freshly initialised weights, refused first when its weights cannot fit this
    machine's memory (naming `config_file`'s fields where the config came from one)."""
    _check_dtype(dtype)
    if isinstance(config, dict):
        config = config_from_dict(config)
    model_class, _, _ = _lookup(config.model_type)
    # Built in the default dtype, then cast: the wider of the two bounds the weights' memory.
    widest = torch.promote_types(torch.get_default_dtype(), dtype or torch.get_default_dtype())
    check_model_fits(config, widest, "cpu", training=False, config_file=config_file)
    model = model_class(config)
    return model.to(dtype) if dtype is not None else model


def _read_json(file: Path) -> Any:
    """A JSON file's value; a directory in its place or text that is not JSON fails naming the file."""
    if not file.is_file():
        raise ValueError(f"{file} is not a file")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None


def load_model_config(path: str | Path) -> ModelConfigBase:
    """The model config of checkpoint directory `path` (its config.json); a damaged one fails naming the file."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        inside = Path(path) / "checkpoints" / "latest" / "model"
        hint = f" (a run directory: its model is {inside})" if (inside / "config.json").exists() else ""
        raise FileNotFoundError(f"{config_file} does not exist: a model directory needs config.json{hint}")
    values = _read_json(config_file)
    if not isinstance(values, dict):
        raise ValueError(f"{config_file} holds a {type(values).__name__}, not a mapping of config fields")
    try:
        return config_from_dict(values)
    except ValidationError as error:  # a ValueError too: caught first for its one-line form
        raise ValueError(f"{config_file}: {'; '.join(validation_problems(error))}") from None
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from None


LOADABLE_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """One safetensors file's tensors. A damaged file, or a NaN/Inf weight (which would only surface later as
    non-finite logits), fails naming the file and the tensor."""
    if not file.is_file():
        raise ValueError(f"{file} {'is not a file' if file.exists() else 'does not exist'}")
    try:
        tensors = load_file(str(file))
    except SafetensorError as error:
        raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_floating_point() and tensor.dtype not in LOADABLE_FLOATS:  # float8: quantized, and isfinite fails
            raise ValueError(f"{file}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}: a quantized "
                             f"checkpoint loads only dequantized (float32, bfloat16 or float16)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{file}: tensor {name!r} holds NaN or Inf values: the checkpoint is damaged")
    return tensors


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return _load_tensors(single)
    if index.exists():
        values = _read_json(index)
        weight_map = values.get("weight_map") if isinstance(values, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ValueError(f"{index} has no weight_map from tensor names to shard file names")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).exists():
                raise ValueError(f"{index}: its weight_map names {shard!r}, which is not in {path}")
            tensors.update(_load_tensors(path / shard))
        return tensors
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"{path} has no model.safetensors or model.safetensors.index.json (found: {found}); "
        "pickle-based weight files are not loaded: convert them to safetensors first"
    )


def _checkpoint_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype that holds every floating tensor of a checkpoint exactly (the widest of theirs); None: none."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if not dtypes:
        return None
    widest = dtypes.pop()
    for other in dtypes:
        widest = torch.promote_types(widest, other)
    return widest


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> FastWeightLM:
    """Load a checkpoint directory written by fla, the LaCT release, or `save_model`; every key must match."""
    _check_dtype(dtype)
    path = Path(path)
    config = load_model_config(path)
    tensors = _read_state_dict(path)
    # Built in its final dtype before the copy, so that a float64 checkpoint never passes through float32.
    model = build_model(config, dtype=dtype if dtype is not None else _checkpoint_dtype(tensors),
                        config_file=str(path / "config.json"))
    if config.tie_word_embeddings:
        # A copy of the embeddings is dropped; an output layer of its own would be lost (fla keeps it, untied).
        head, embeddings = tensors.pop("lm_head.weight", None), tensors.get(EMBEDDINGS_KEY)
        if head is not None and embeddings is not None and not torch.equal(head, embeddings):
            raise ValueError(f"{path / 'config.json'}: tie_word_embeddings=true, but the checkpoint's lm_head.weight "
                             f"differs from its {EMBEDDINGS_KEY}: the output layer it stores would be lost; set "
                             f"tie_word_embeddings to false in config.json to load it as it is")
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint {path} does not match {type(model).__name__}: missing={missing} "
            f"unexpected={unexpected} shape mismatches={mismatched}"
        )
    # load_state_dict would cast integer weights (a quantized checkpoint's) to float silently: scales lost.
    not_float = [f"{k} ({str(tensors[k].dtype).removeprefix('torch.')})" for k in sorted(expected)
                 if expected[k].is_floating_point() and not tensors[k].is_floating_point()]
    if not_float:
        raise ValueError(f"checkpoint {path} holds {len(not_float)} non-floating tensors where {type(model).__name__} "
                         f"has floating weights, e.g. {not_float[0]}: a quantized checkpoint loads only "
                         f"dequantized (float32, bfloat16 or float16)")
    model.load_state_dict(tensors, strict=not config.tie_word_embeddings)
    return model.to(device)


def save_model(model: FastWeightLM, path: str | Path) -> Path:
    """Write config.json + model.safetensors in the layout the original library's class loads, fsynced."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _, _, original_name = _lookup(model.config.model_type)
    config = model.config.to_json_dict()
    config["architectures"] = [original_name]
    # What the tensors are now (a checkpoint loaded in another dtype keeps its old torch_dtype otherwise):
    # transformers' torch_dtype="auto" builds the model in this dtype.
    dtype_name = str(model.dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype_name
    if "dtype" in config:  # transformers 5's name for it
        config["dtype"] = dtype_name
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")  # shared with the embeddings; safetensors refuses aliases
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    # safetensors makes its file 0600 whatever the umask: the weights take config.json's mode (the umask's), so
    # those who may read a checkpoint's other files may read its weights too.
    shutil.copymode(path / "config.json", path / "model.safetensors")
    sync_tree(path)  # on disk, not only in the page cache: a machine crash leaves no empty weight file
    return path


def inspect_model(model: FastWeightLM) -> dict[str, Any]:
    """Architecture summary used by `refine model inspect`."""
    probe = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        state = model(probe).state
    state_elements = state.num_elements_per_sequence() if state is not None else 0
    state_bytes = state.num_bytes_per_sequence() if state is not None else 0
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "hidden_size": model.config.hidden_size,
        "num_hidden_layers": model.config.num_hidden_layers,
        "num_heads": model.config.num_heads,
        "vocab_size": model.config.vocab_size,
        "parameters": model.num_parameters(),
        "recurrent_state_elements_per_sequence": state_elements,
        "recurrent_state_bytes_per_sequence": state_bytes,
        # Every layer holds the same tensors; the shapes are per sequence (the batch dimension dropped).
        "state_tensors_per_layer": {
            name: list(t.shape[1:]) for name, t in (state.layers[0].items() if state else [])
        },
    }
