"""DeltaNet language model: fla's DeltaNetForCausalLM, parameter for parameter."""

from refine.models.base import FastWeightLM
from refine.models.config import DeltaNetConfig
from refine.models.delta_mixers import DeltaNetMixer


class DeltaNetForCausalLM(FastWeightLM):
    config_class = DeltaNetConfig

    def make_mixer(self, config: DeltaNetConfig, layer_idx: int) -> DeltaNetMixer:
        return DeltaNetMixer(config, layer_idx)
