"""Transformers config classes for our checkpoint directories, so that vLLM can read their config.json.

vLLM parses a model directory's config.json through transformers' AutoConfig; `delta_net` and
`gated_deltanet` are flash-linear-attention's model types, unknown to transformers itself. These
classes carry every field of the file as attributes; the model classes validate them with the
project's own pydantic configs (`refine.models.config`), so a field vLLM cannot serve fails there
with its name and value.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from refine.models import config_from_dict
from refine.models.config import DeltaNetConfig, GatedDeltaNetConfig


class _FastWeightHFConfig(PretrainedConfig):
    # vLLM's ModelConfig asks for `num_attention_heads`; fla's configs call it `num_heads`.
    attribute_map = {"num_attention_heads": "num_heads"}

    def __init__(self, **kwargs):
        kwargs.setdefault("model_type", self.model_type)
        # Validate and fill fla's defaults for missing fields before transformers stores them.
        fields = config_from_dict({**kwargs, "model_type": self.model_type}).model_dump()
        for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs[key] = fields.pop(key)
        super().__init__(**{**fields, **kwargs})


# Each class names its __init__ in its own body: transformers 5 turns every config class into a dataclass
# and gives one without an __init__ of its own a generated one, which would skip the checks and defaults.
class DeltaNetHFConfig(_FastWeightHFConfig):
    model_type = "delta_net"
    __init__ = _FastWeightHFConfig.__init__


class GatedDeltaNetHFConfig(_FastWeightHFConfig):
    model_type = "gated_deltanet"
    __init__ = _FastWeightHFConfig.__init__


def refine_config(hf_config: PretrainedConfig) -> DeltaNetConfig | GatedDeltaNetConfig:
    """The project's validated model config from the config vLLM loaded."""
    values = hf_config.to_dict()
    config = config_from_dict(values)
    if not isinstance(config, (DeltaNetConfig, GatedDeltaNetConfig)):
        raise ValueError(f"model_type={values.get('model_type')!r} is not served by the vLLM plugin "
                         "(delta_net and gated_deltanet are)")
    return config


HF_CONFIGS: dict[str, type[PretrainedConfig]] = {
    DeltaNetHFConfig.model_type: DeltaNetHFConfig,
    GatedDeltaNetHFConfig.model_type: GatedDeltaNetHFConfig,
}
