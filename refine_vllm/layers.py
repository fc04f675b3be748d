"""Our DeltaNet / Gated DeltaNet blocks built from vLLM layers, on vLLM's recurrent-state machinery.

The token mixer reuses vLLM's gated delta-rule attention layer (`QwenGatedDeltaNetAttention`): it owns
the per-layer state slots (a short-convolution state over [q, k, v] and the [H, V, K] delta-rule
matrix), declares their shapes and dtypes to the cache manager, and runs vLLM's kernels for the
platform (C++ on CPU, Triton / CUDA on GPUs) with chunked prefill, prefix caching and batched
decoding. What differs from Qwen's layer is only around that core:

- projections: q, k, v (and the output gate g when the model has one) are fla's separate linear
  layers, fused here into one matmul; b (and a for Gated DeltaNet) likewise;
- DeltaNet has no decay: it is the gated delta rule with g = 0, obtained with A_log = -1e4
  (exp underflows to exactly 0, so the decay factor is exactly 1) and a = 0;
- DeltaNet without an output gate normalizes with a plain RMSNorm.

Parameter names follow fla's checkpoints through `CHECKPOINT_TO_PARAM` (see `load_param` and
`refine_vllm.models`' `load_weights`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.utils.torch_utils import _encode_layer_name

from refine.models.config import DeltaNetConfig, GatedDeltaNetConfig
from refine_vllm.servable import CPU_CONV_SIZE, check_servable, cpu_conv_problems, cpu_head_dim_problems, mixer_dims

NO_DECAY_A_LOG = -1.0e4  # exp(-1e4) == 0.0 in float32: g = -exp(A_log) * softplus(.) == 0


def check_platform(config: DeltaNetConfig | GatedDeltaNetConfig, dtype: torch.dtype) -> None:
    """vLLM's CPU delta-rule kernels compute in bfloat16 with equal key and value head dims of 64 or 128."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    problems = cpu_head_dim_problems(config) + cpu_conv_problems(config)
    if dtype != torch.bfloat16:
        problems.append(f"dtype={dtype}")
    if problems:
        raise ValueError(f"vLLM's CPU delta-rule kernels need bfloat16, equal key and value head dims of 64 or 128 "
                         f"and short convolutions of width {CPU_CONV_SIZE}; this {config.model_type} model has "
                         + ", ".join(problems))


def layer_config(config: DeltaNetConfig | GatedDeltaNetConfig) -> SimpleNamespace:
    """The attribute names vLLM's gated delta-rule layer reads, from our config."""
    dims = mixer_dims(config)
    return SimpleNamespace(
        hidden_size=config.hidden_size,
        hidden_act="silu",  # the short convolutions' activation (fla: silu on q, k and v)
        rms_norm_eps=config.norm_eps,
        linear_num_key_heads=dims["num_k_heads"],
        linear_num_value_heads=dims["num_v_heads"],
        linear_key_head_dim=dims["head_k_dim"],
        linear_value_head_dim=dims["head_v_dim"],
        linear_conv_kernel_dim=config.conv_size,
        # fla's gated norm: swish (silu) unless a Gated DeltaNet asks for sigmoid; vLLM's RMSNormGated has both.
        output_gate_type=getattr(config, "output_gate_activation", "silu"),
    )


def _sharded_rows_loader(dims: list[int], tp_size: int, tp_rank: int):
    """Loader of one section (shard id) of a row-concatenated parameter, split across TP ranks."""
    local = [d // tp_size for d in dims]

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: int) -> None:
        size = local[shard_id]
        offset = sum(local[:shard_id])
        rows = loaded[tp_rank * size:(tp_rank + 1) * size]
        param.data[offset:offset + size].copy_(rows.view_as(param.data[offset:offset + size]))

    return load


class DeltaRuleMixer(QwenGatedDeltaNetAttention):
    """fla's DeltaNet / GatedDeltaNet layer on vLLM's gated delta-rule state slots and kernels."""

    def __init__(self, config: DeltaNetConfig | GatedDeltaNetConfig, vllm_config: VllmConfig, prefix: str):
        check_servable(config)
        check_platform(config, vllm_config.model_config.dtype)
        self.has_decay = isinstance(config, GatedDeltaNetConfig)
        self.has_output_gate = config.use_gate
        super().__init__(layer_config(config), vllm_config, prefix=prefix, gqa_interleaved_layout=False)
        if not self.has_output_gate:
            self.norm = RMSNorm(self.head_v_dim, eps=config.norm_eps)
        # fla keeps q, k and v convolutions apart; vLLM runs them as one over [q, k, v].
        self.conv1d.weight.weight_loader = _sharded_rows_loader(
            [self.key_dim, self.key_dim, self.value_dim], self.tp_size, self.tp_rank)

    # Called by the parent's __init__: our fused projections' sections.
    def create_qkvz_proj(self, hidden_size, key_dim, value_dim, quant_config, prefix):
        sizes = [key_dim, key_dim, value_dim] + ([value_dim] if self.has_output_gate else [])
        return MergedColumnParallelLinear(input_size=hidden_size, output_sizes=sizes, bias=False,
                                          quant_config=quant_config, prefix=prefix)

    def create_ba_proj(self, hidden_size, num_v_heads, quant_config, prefix):
        sizes = [num_v_heads, num_v_heads] if self.has_decay else [num_v_heads]
        return MergedColumnParallelLinear(input_size=hidden_size, output_sizes=sizes, bias=False,
                                          quant_config=quant_config, prefix=prefix)

    def _project(self, hidden_states: torch.Tensor):
        mixed, _ = self.in_proj_qkvz(hidden_states)
        qkv_size = (2 * self.key_dim + self.value_dim) // self.tp_size
        z = None
        if self.has_output_gate:
            mixed, z = mixed.split([qkv_size, self.value_dim // self.tp_size], dim=-1)
            z = z.reshape(z.size(0), -1, self.head_v_dim)
        ba, _ = self.in_proj_ba(hidden_states)
        if self.has_decay:
            b, a = ba.chunk(2, dim=-1)
        else:
            b, a = ba, torch.zeros_like(ba)
        return mixed, z, b.contiguous(), a.contiguous()

    def _forward_with(self, hidden_states: torch.Tensor, core_op) -> torch.Tensor:
        mixed_qkv, z, b, a = self._project(hidden_states)
        core = torch.zeros((hidden_states.size(0), self.num_v_heads // self.tp_size, self.head_v_dim),
                           dtype=hidden_states.dtype, device=hidden_states.device)
        core_op(mixed_qkv, b, a, core, _encode_layer_name(self.prefix))
        if z is None:
            core = self.norm(core.reshape(-1, self.head_v_dim)).view_as(core)
        else:
            core = self.norm(core, z)
        output, _ = self.out_proj(core.flatten(-2))
        return output

    def forward_cpu(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._forward_with(hidden_states, torch.ops.vllm.cpu_gdn_attention_core)

    def forward_cuda(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._forward_with(hidden_states, torch.ops.vllm.qwen_gdn_attention_core)

    def forward_hip(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.forward_cuda(hidden_states)

    def forward_xpu(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the refine vLLM plugin serves CPU and CUDA / ROCm devices")

    def constant_weights(self) -> dict[str, torch.Tensor]:
        """Parameters DeltaNet's checkpoints do not have (no decay): local name -> full tensor."""
        if self.has_decay:
            return {}
        return {"A_log": torch.full((self.num_v_heads,), NO_DECAY_A_LOG),
                "dt_bias": torch.zeros(self.num_v_heads)}


class SwiGLU(nn.Module):
    """fla's GatedMLP: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=False,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act(gate_up))
        return out


class Block(nn.Module):
    """Pre-norm residual block, fla's layout: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""

    def __init__(self, config: DeltaNetConfig | GatedDeltaNetConfig, vllm_config: VllmConfig, prefix: str,
                 intermediate_size: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = DeltaRuleMixer(config, vllm_config, prefix=f"{prefix}.attn")
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, intermediate_size, prefix=f"{prefix}.mlp")

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.attn_norm(hidden_states)
        else:
            hidden_states, residual = self.attn_norm(hidden_states, residual)
        hidden_states = self.attn(hidden_states)
        hidden_states, residual = self.mlp_norm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# Checkpoint parameter (inside a layer) -> (vLLM parameter, shard id or None).
CHECKPOINT_TO_PARAM: dict[str, tuple[str, int | None]] = {
    "attn.q_proj.weight": ("attn.in_proj_qkvz.weight", 0),
    "attn.k_proj.weight": ("attn.in_proj_qkvz.weight", 1),
    "attn.v_proj.weight": ("attn.in_proj_qkvz.weight", 2),
    "attn.g_proj.weight": ("attn.in_proj_qkvz.weight", 3),
    "attn.b_proj.weight": ("attn.in_proj_ba.weight", 0),
    "attn.a_proj.weight": ("attn.in_proj_ba.weight", 1),
    "attn.q_conv1d.weight": ("attn.conv1d.weight", 0),
    "attn.k_conv1d.weight": ("attn.conv1d.weight", 1),
    "attn.v_conv1d.weight": ("attn.conv1d.weight", 2),
    "attn.o_norm.weight": ("attn.norm.weight", None),
    "attn.o_proj.weight": ("attn.out_proj.weight", None),
    "attn.A_log": ("attn.A_log", None),
    "attn.dt_bias": ("attn.dt_bias", None),
    "attn_norm.weight": ("attn_norm.weight", None),
    "mlp_norm.weight": ("mlp_norm.weight", None),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
    "mlp.down_proj.weight": ("mlp.down_proj.weight", None),
}


def load_param(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    loader = getattr(param, "weight_loader", default_weight_loader)
    if shard_id is None:
        loader(param, tensor)
    else:
        loader(param, tensor, shard_id)


__all__ = ["Block", "CHECKPOINT_TO_PARAM", "DeltaRuleMixer", "SwiGLU", "check_platform", "check_servable",
           "load_param", "mixer_dims"]
