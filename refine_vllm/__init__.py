"""vLLM plugin: our DeltaNet and Gated DeltaNet checkpoints served as out-of-tree vLLM models.

vLLM calls `register` in every process it starts (the `vllm.general_plugins` entry point named
`refine`); it is idempotent and imports no vLLM model code until a model is built.
"""

from __future__ import annotations

ARCHITECTURES = {
    "DeltaNetForCausalLM": "refine_vllm.models:DeltaNetForCausalLM",
    "GatedDeltaNetForCausalLM": "refine_vllm.models:GatedDeltaNetForCausalLM",
}


def register() -> None:
    """Teach transformers our config.json model types and vLLM our architecture names."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig

    from refine_vllm.hf_config import HF_CONFIGS

    for model_type, config_class in HF_CONFIGS.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
    supported = set(ModelRegistry.get_supported_archs())
    for architecture, target in ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, target)
        # Attention-free recurrent models get their state-cache settings (block size of the
        # state cache, prefix-caching mode) from the same hook as vLLM's own Mamba models.
        MODELS_CONFIG_MAP.setdefault(architecture, MambaModelConfig)
