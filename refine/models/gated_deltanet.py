"""Gated DeltaNet language model: fla's GatedDeltaNetForCausalLM, parameter for parameter."""

from refine.models.base import FastWeightLM
from refine.models.config import GatedDeltaNetConfig
from refine.models.delta_mixers import GatedDeltaNetMixer


class GatedDeltaNetForCausalLM(FastWeightLM):
    config_class = GatedDeltaNetConfig

    def make_mixer(self, config: GatedDeltaNetConfig, layer_idx: int) -> GatedDeltaNetMixer:
        return GatedDeltaNetMixer(config, layer_idx)
