"""vLLM model classes for our DeltaNet and Gated DeltaNet checkpoints (fla's architecture names).

Attention-free recurrent models on vLLM's mamba-style interfaces: `HasInnerState` and
`IsAttentionFree` (the state is constant in the number of tokens; no KV cache),
`SupportsMambaPrefixCaching` (states are cached at block boundaries and copied on a hit), and the
class methods that give the cache manager each layer's state shapes, dtypes and copy functions.
Weights load from the same directories as `refine.models.load_model` (fla's parameter names).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from refine.models.common import mlp_intermediate_size
from refine_vllm.hf_config import refine_config
from refine_vllm.layers import CHECKPOINT_TO_PARAM, Block, DeltaRuleMixer, load_param, mixer_dims


class FastWeightBackbone(nn.Module):
    """Embeddings -> blocks -> final norm, under fla's module names (`model.*`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = refine_config(vllm_config.model_config.hf_config)
        self.config = config
        intermediate = mlp_intermediate_size(config.hidden_size, config.hidden_ratio, config.intermediate_size)
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: Block(config, vllm_config, prefix, intermediate),
            prefix=f"{prefix}.layers",
        )
        last_stage = get_pp_group().is_last_rank
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps) if last_stage else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in self.layers[self.start_layer:self.end_layer]:
            hidden, residual = layer(hidden, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden, "residual": residual})
        hidden, _ = self.norm(hidden, residual)
        return hidden


class _FastWeightForCausalLM(nn.Module, HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.vllm_config = vllm_config
        self.model = FastWeightBackbone(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        config = self.model.config
        self.config = config
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embeddings)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # --- recurrent-state interface: what each layer's state slots hold ---
    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
            vllm_config.model_config.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        config = refine_config(vllm_config.model_config.hf_config)
        dims = mixer_dims(config)
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            vllm_config.parallel_config.tensor_parallel_size, dims["num_k_heads"], dims["num_v_heads"],
            dims["head_k_dim"], dims["head_v_dim"], config.conv_size, vllm_config.num_speculative_tokens)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()

    # --- weights: fla's checkpoint names ---
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = self._param_for(name)
            if target is None or target not in params:  # tied head, or a layer of another pipeline stage
                continue
            load_param(params[target], tensor, shard)
            loaded.add(target)
            if target == "model.embeddings.weight" and self.config.tie_word_embeddings and "lm_head.weight" in params:
                # The head shares this tensor; loading it through the head as well makes vLLM process
                # the head again after a weight refresh (on CPU: re-pack its GEMM weights).
                load_param(params["lm_head.weight"], tensor, None)
                loaded.add("lm_head.weight")
        for index in range(self.model.start_layer, self.model.end_layer):
            mixer: DeltaRuleMixer = self.model.layers[index].attn
            for local, tensor in mixer.constant_weights().items():
                target = f"model.layers.{index}.attn.{local}"
                load_param(params[target], tensor, None)
                loaded.add(target)
        return loaded

    def _param_for(self, name: str) -> tuple[str | None, int | None]:
        if name == "lm_head.weight":
            return (None, None) if self.config.tie_word_embeddings else (name, None)
        if name in ("model.embeddings.weight", "model.norm.weight"):
            return name, None
        parts = name.split(".", 3)  # model, layers, index, rest
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in CHECKPOINT_TO_PARAM:
            local, shard = CHECKPOINT_TO_PARAM[parts[3]]
            return f"model.layers.{parts[2]}.{local}", shard
        raise ValueError(f"checkpoint parameter {name!r} has no place in {type(self).__name__}")


class DeltaNetForCausalLM(_FastWeightForCausalLM):
    """fla's DeltaNetForCausalLM served by vLLM."""


class GatedDeltaNetForCausalLM(_FastWeightForCausalLM):
    """fla's GatedDeltaNetForCausalLM served by vLLM."""
