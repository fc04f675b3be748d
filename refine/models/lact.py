"""LaCT language model (Large Chunk Test-Time Training), parameter for parameter the `lact_swiglu`
model of the LaCT release (lact_llm): each block's token mixer runs sliding-window attention in
parallel with SwiGLU fast weights trained at test time chunk by chunk (apply, then update).

Per layer state (batch first):
    fw_w0, fw_w1, fw_w2          fast weights read by the chunk in progress   [B, H, rows, cols]
    fw_main_w0, ..._w2           un-normalized weights (ttt_prenorm only)
    momentum_w0, ..._w2          previous chunk update (use_momentum only)
    grad_w0, grad_w1, grad_w2    gradient sums of the unfinished chunk's tokens
    momentum_sum                 their momentum coefficients' sum [B, H] (use_momentum only)
    attn_k, attn_v               last window_size - 1 keys (after rotary) and values [B, W-1, heads, d]
    tokens_seen                  tokens consumed so far [B] (rotary positions, chunk phase, valid keys)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from refine.models.base import FastWeightLM
from refine.models.common import RMSNorm, gather_positions
from refine.models.config import MAX_EXPAND, MAX_INITIALIZER_RANGE, ModelConfigBase
from refine.models.lact_ops import (
    ChunkRule,
    FastWeightState,
    FastWeightStatesAt,
    apply_rotary,
    chunked_swiglu_ttt,
    compute_dtype,
    l2_normalize,
    rotary_cos_sin,
    sliding_window_attention,
)

_BASE_LR = 0.001  # the release's initial per-token learning rate before softplus
_NORM_EPS = 1e-5  # the release's q/k/ttt norms use fla's default eps, not config.norm_eps
_WEIGHTS = ("w0", "w1", "w2")
# fw_init_gain scales the low-rank fast weights' initial std (gain / sqrt(dim)): 1 already keeps unit-scale
# inputs at unit scale; 20 times the release's 0.5 is far past any use and short of overflowing float32.
MAX_FW_INIT_GAIN = 10.0


class LaCTConfig(ModelConfigBase):
    """The LaCT release's LaCTSWIGLUConfig fields and defaults (model_type "lact_swiglu").

    fuse_norm, last_layer_fuse_norm, fuse_swiglu, fuse_cross_entropy, use_fused_kernel, fp32_states,
    elementwise_affine and use_cache select kernels in the release and are kept so that config.json
    round-trips; we compute the release's plain PyTorch path. Its fused kernel (use_fused_kernel, GPU only)
    is not quite that function with use_muon: it orthogonalizes dw0 and dw2 stacked together (so that pair is
    refused). Fast weights
    always update in at least float32; the release's GPU path runs them under bfloat16 autocast.
    Checked against the release's own code (lact_llm at 1f84d47, float64, its Triton pieces swapped for fla's
    references): logits and carried states agree to 1e-13, gradients to 1e-11, Muon and low-rank fast weights
    included.
    """

    model_type: Literal["lact_swiglu"] = "lact_swiglu"
    hidden_size: int = Field(2048, gt=0)
    num_hidden_layers: int = Field(24, gt=0)
    num_attn_heads: int = Field(32, gt=0)
    num_lact_heads: int = Field(4, gt=0)
    inter_multi: int | float = Field(1, gt=0, le=MAX_EXPAND)  # a width multiple, as expand_k / expand_v
    qkv_bias: bool = False
    attn_qk_norm: bool = False
    lact_chunk_size: int = Field(2048, gt=0)
    use_muon: bool = False
    lr_dim: int = Field(1, gt=0)
    qkv_silu: bool = True
    no_v_silu: bool = False
    lr_parameterization: Literal["mamba"] = "mamba"
    learnable_ttt_scale: bool = True
    use_momentum: bool = True
    ttt_loss_type: Literal["dot_product"] = "dot_product"
    ttt_prenorm: bool = False
    ttt_nope: bool = False
    w0_w2_low_rank: int = -1
    window_size: int = Field(2048, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    max_position_embeddings: int = 2048
    initializer_range: float = Field(0.006, gt=0, le=MAX_INITIALIZER_RANGE)
    elementwise_affine: bool | None = True
    use_cache: bool = True
    fuse_norm: bool = True
    last_layer_fuse_norm: bool = True
    fuse_swiglu: bool = True
    fuse_cross_entropy: bool = True
    fw_init_gain: float = Field(0.5, gt=0, le=MAX_FW_INIT_GAIN)
    use_fused_kernel: bool = False
    fp32_states: bool = False

    @model_validator(mode="before")
    @classmethod
    def _heads_alias(cls, values: Any) -> Any:
        # The release has no num_heads; the shared field mirrors the attention heads, and names them when
        # num_attn_heads is not given. Given both, they must agree: one of them would go unread.
        if not isinstance(values, dict):
            return values
        if "num_heads" not in values:
            return {**values, "num_heads": values.get("num_attn_heads", 32)}
        if "num_attn_heads" not in values:
            return {**values, "num_attn_heads": values["num_heads"]}
        if values["num_heads"] != values["num_attn_heads"]:
            raise ValueError(f"num_heads={values['num_heads']!r} and num_attn_heads={values['num_attn_heads']!r} "
                             f"differ: a LaCT model's heads are its attention heads (num_heads mirrors "
                             f"num_attn_heads); give one of them")
        return values

    @field_validator("lr_parameterization", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("window_size", mode="before")
    @classmethod
    def _window_required(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("window_size=None (full attention) is not supported: the recurrent state keeps a "
                             "fixed window of keys and values; give window_size a positive integer")
        return value

    @model_validator(mode="after")
    def _dims_divide(self) -> "LaCTConfig":
        hidden, attn_heads, fw_heads = self.hidden_size, self.num_attn_heads, self.num_lact_heads
        if hidden % attn_heads:
            raise ValueError(f"hidden_size={hidden} must be divisible by num_attn_heads={attn_heads}")
        if (hidden // attn_heads) % 2:
            raise ValueError(f"hidden_size / num_attn_heads = {hidden // attn_heads} must be even "
                             f"(num_attn_heads={attn_heads}; rotary embeddings rotate pairs of channels)")
        if hidden % fw_heads:
            raise ValueError(f"hidden_size={hidden} must be divisible by num_lact_heads={fw_heads}")
        head_dim = hidden // fw_heads
        inner = int(head_dim * self.inter_multi)
        if inner < 1:
            raise ValueError(f"inter_multi={self.inter_multi} gives a fast-weight hidden size of {inner}; "
                             "must be >= 1")
        if self.lr_dim != 1 and not (self.lr_dim == head_dim == inner):
            raise ValueError(f"lr_dim={self.lr_dim} must be 1 or equal the fast-weight head size {head_dim} "
                             f"(with inter_multi=1) so that per-channel learning rates broadcast")
        return self

    @model_validator(mode="after")
    def _fused_muon_is_not_ours(self) -> "LaCTConfig":
        # The release's fused kernel orthogonalizes dw0 and dw2 stacked together; we compute its plain path, which
        # orthogonalizes each: a checkpoint trained with both flags would run as another function here.
        if self.use_fused_kernel and self.use_muon:
            raise ValueError("use_fused_kernel=true with use_muon=true is the release's fused kernel, whose Muon step "
                             "orthogonalizes dw0 and dw2 together; this library computes the plain path (each apart), "
                             "another function: set use_fused_kernel to false to run the plain path")
        return self

    @property
    def fw_head_dim(self) -> int:
        return self.hidden_size // self.num_lact_heads

    def to_json_dict(self) -> dict:
        values = super().to_json_dict()
        values.pop("num_heads", None)
        return values


class LowRankFastWeight(nn.Module):
    """Initial fast weight w_left @ w_right + 0.5 * I, per head: [H, out_features, in_features]."""

    def __init__(self, num_heads: int, out_features: int, in_features: int, rank: int, init_gain: float):
        super().__init__()
        self.rank = rank
        self.in_features = in_features
        self.out_features = out_features
        self.init_gain = init_gain
        self.w_left = nn.Parameter(torch.empty(num_heads, out_features, rank))
        self.w_right = nn.Parameter(torch.empty(num_heads, rank, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_left, std=self.init_gain / math.sqrt(self.rank))
        nn.init.normal_(self.w_right, std=self.init_gain / math.sqrt(self.in_features))

    def forward(self) -> Tensor:
        eye = torch.eye(self.out_features, self.in_features, device=self.w_left.device, dtype=self.w_left.dtype)
        return self.w_left @ self.w_right + 0.5 * eye


class LaCTSWIGLULayer(nn.Module):
    """Window attention + SwiGLU fast-weight test-time training, summed before o_proj."""

    def __init__(self, config: LaCTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attn_heads
        self.head_dim = config.hidden_size // config.num_attn_heads
        self.window_size = config.window_size
        self.rope_theta = config.rope_theta
        self.num_fw_heads = config.num_lact_heads
        self.fw_head_dim = config.fw_head_dim
        self.d_in = self.d_out = self.fw_head_dim
        self.d_h = int(self.fw_head_dim * config.inter_multi)
        self.lr_dim_per_head = config.lr_dim
        self.qkv_silu = config.qkv_silu
        self.no_v_silu = config.no_v_silu
        self.ttt_prenorm = config.ttt_prenorm
        self.ttt_nope = config.ttt_nope
        self.use_muon = config.use_muon
        self.use_momentum = config.use_momentum
        self.lact_chunk_size = config.lact_chunk_size
        self.w0_w2_low_rank = config.w0_w2_low_rank
        self.fw_init_gain = config.fw_init_gain
        self.learnable_ttt_scale = config.learnable_ttt_scale
        self.attn_qk_norm = config.attn_qk_norm
        self.base_lr_inv = _BASE_LR + math.log(-math.expm1(-_BASE_LR))  # softplus^-1(0.001)

        hidden = config.hidden_size
        self.qkv = nn.Linear(hidden, hidden * 3, bias=config.qkv_bias)
        if self.attn_qk_norm:
            self.q_norm = RMSNorm(hidden, eps=_NORM_EPS)
            self.k_norm = RMSNorm(hidden, eps=_NORM_EPS)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

        heads = self.num_fw_heads
        if self.w0_w2_low_rank > 0:
            rank = self.w0_w2_low_rank
            self.w0 = LowRankFastWeight(heads, self.d_h, self.d_in, rank, self.fw_init_gain)
            self.w2 = LowRankFastWeight(heads, self.d_h, self.d_in, rank, self.fw_init_gain)
        else:
            self.w0 = nn.Parameter(torch.empty(heads, self.d_h, self.d_in))
            self.w2 = nn.Parameter(torch.empty(heads, self.d_h, self.d_in))
        self.w1 = nn.Parameter(torch.empty(heads, self.d_out, self.d_h))

        self.lr_dim = config.lr_dim * 3 * heads
        self.lr_proj = nn.Linear(hidden, self.lr_dim)
        self.qk_scale = nn.Parameter(torch.ones(hidden, 2))
        self.qk_offset = nn.Parameter(torch.zeros(hidden, 2))
        if self.learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(hidden, heads)
        self.ttt_norm = RMSNorm(self.fw_head_dim, eps=_NORM_EPS)
        if self.use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(hidden, heads), nn.Sigmoid())
        self.reset_fast_weights()

    def reset_fast_weights(self) -> None:
        """The release's initialization of the layer's own parameters (linear layers: the model's)."""
        with torch.no_grad():
            self.qk_scale.fill_(1.0)
            self.qk_offset.zero_()
            if self.w0_w2_low_rank > 0:
                self.w0.reset_parameters()
                self.w2.reset_parameters()
            else:
                nn.init.normal_(self.w0, std=1.0 / math.sqrt(self.fw_head_dim))
                nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.fw_head_dim))
            nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.d_h))

    def initial_fast_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.w0_w2_low_rank > 0:
            return self.w0(), self.w1, self.w2()
        return self.w0, self.w1, self.w2

    # ---- state -------------------------------------------------------------------------------

    @property
    def state_names(self) -> frozenset[str]:
        """The keys of this layer's state (those initial_state makes)."""
        names = {f"fw_{n}" for n in _WEIGHTS} | {f"grad_{n}" for n in _WEIGHTS}
        if self.ttt_prenorm:
            names |= {f"fw_main_{n}" for n in _WEIGHTS}
        if self.use_momentum:
            names |= {f"momentum_{n}" for n in _WEIGHTS} | {"momentum_sum"}
        return frozenset(names | {"attn_k", "attn_v", "tokens_seen"})

    def initial_state(self, batch_size: int, like: Tensor) -> dict[str, Tensor]:
        dtype = compute_dtype(like.dtype)
        weights = [w.to(dtype).unsqueeze(0).expand(batch_size, *w.shape) for w in self.initial_fast_weights()]
        state = {f"fw_{n}": w for n, w in zip(_WEIGHTS, weights)}
        if self.ttt_prenorm:
            state.update({f"fw_main_{n}": w for n, w in zip(_WEIGHTS, weights)})
        state.update({f"grad_{n}": torch.zeros_like(w) for n, w in zip(_WEIGHTS, weights)})
        if self.use_momentum:
            state.update({f"momentum_{n}": torch.zeros_like(w) for n, w in zip(_WEIGHTS, weights)})
            state["momentum_sum"] = like.new_zeros(batch_size, self.num_fw_heads, dtype=dtype)
        buffer = like.new_zeros(batch_size, self.window_size - 1, self.num_heads, self.head_dim)
        state["attn_k"], state["attn_v"] = buffer, buffer.clone()
        state["tokens_seen"] = torch.zeros(batch_size, dtype=torch.long, device=like.device)
        return state

    def _fast_state(self, state: dict[str, Tensor], dtype: torch.dtype) -> FastWeightState:
        def triple(prefix: str) -> tuple[Tensor, Tensor, Tensor]:
            return tuple(state[f"{prefix}{n}"].to(dtype) for n in _WEIGHTS)

        applied = triple("fw_")
        return FastWeightState(
            applied=applied,
            base=triple("fw_main_") if self.ttt_prenorm else applied,
            momentum=triple("momentum_") if self.use_momentum else None,
            grad=triple("grad_"),
            momentum_sum=state["momentum_sum"].to(dtype) if self.use_momentum else None,
        )

    def _fast_state_dict(self, fast: FastWeightState) -> dict[str, Tensor]:
        out = {f"fw_{n}": w for n, w in zip(_WEIGHTS, fast.applied)}
        if self.ttt_prenorm:
            out.update({f"fw_main_{n}": w for n, w in zip(_WEIGHTS, fast.base)})
        out.update({f"grad_{n}": w for n, w in zip(_WEIGHTS, fast.grad)})
        if self.use_momentum:
            out.update({f"momentum_{n}": w for n, w in zip(_WEIGHTS, fast.momentum)})
            out["momentum_sum"] = fast.momentum_sum
        return out

    # ---- forward -----------------------------------------------------------------------------

    def forward(
        self, x: Tensor, state: dict[str, Tensor] | None, want_states: bool, final_only: bool = False
    ) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]] | None]:
        """x [B, T, D] -> (y [B, T, D], states_at: positions [B, P] -> state dict of batch B * P).

        states_at(None) is the state after every row's last token (batch B). final_only is not read:
        LaCT has one kernel, which serves every request."""
        batch, seq_len, hidden = x.shape
        if state is None:
            state = self.initial_state(batch, x)
        # Counters are integers; round in case a dtype cast turned them into floats.
        seen = state["tokens_seen"].to(x.device).round().long()
        if seq_len == 0:
            def unchanged(positions: Tensor | None) -> dict[str, Tensor]:
                repeats = 1 if positions is None else positions.shape[1]
                return {name: t.repeat_interleave(repeats, 0) for name, t in state.items()}
            return x, unchanged if want_states else None

        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        fast_q = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]
        fast_k = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]

        token_positions = seen[:, None] + torch.arange(seq_len, device=x.device)
        cos, sin = rotary_cos_sin(token_positions, self.head_dim, self.rope_theta, x.dtype)
        heads = (batch, seq_len, self.num_heads, self.head_dim)
        q = apply_rotary(q.reshape(heads), cos, sin)
        k = apply_rotary(k.reshape(heads), cos, sin)
        keys = torch.cat([state["attn_k"].to(x.dtype), k], dim=1)
        values = torch.cat([state["attn_v"].to(x.dtype), v.reshape(heads)], dim=1)
        attended = sliding_window_attention(q, keys, values, seen.clamp(max=self.window_size - 1))

        ttt, fast_states_at = self._test_time_training(x, fast_q, fast_k, v, cos, sin, state, seen, want_states)
        y = self.o_proj(attended.reshape(batch, seq_len, hidden) + ttt.to(x.dtype))
        if not want_states:
            return y, None

        def states_at(positions: Tensor | None) -> dict[str, Tensor]:
            if positions is None:  # every row's end
                positions = torch.full((batch, 1), seq_len, dtype=torch.long, device=x.device)
            states = self._fast_state_dict(fast_states_at(positions))
            buffered = self.window_size - 1
            states["attn_k"] = gather_positions(keys, positions, buffered)
            states["attn_v"] = gather_positions(values, positions, buffered)
            states["tokens_seen"] = (seen[:, None] + positions).flatten()
            return states

        return y, states_at

    def _test_time_training(
        self, x: Tensor, fast_q: Tensor, fast_k: Tensor, fast_v: Tensor, cos: Tensor, sin: Tensor,
        state: dict[str, Tensor], seen: Tensor, want_states: bool,
    ) -> tuple[Tensor, FastWeightStatesAt | None]:
        batch, seq_len, _ = x.shape
        dtype = compute_dtype(x.dtype)
        fw_heads = (batch, seq_len, self.num_fw_heads, self.fw_head_dim)
        fq, fk, fv = (t.to(dtype).reshape(fw_heads) for t in (fast_q, fast_k, fast_v))
        if self.qkv_silu:
            fq, fk = F.silu(fq), F.silu(fk)
            if not self.no_v_silu:
                fv = F.silu(fv)
        fq, fk = l2_normalize(fq), l2_normalize(fk)
        if not self.ttt_nope:
            # Same rotary as the attention, over the attention's head split of the hidden size.
            attn_heads = (batch, seq_len, self.num_heads, self.head_dim)
            fq = apply_rotary(fq.reshape(attn_heads), cos, sin).reshape(fw_heads)
            fk = apply_rotary(fk.reshape(attn_heads), cos, sin).reshape(fw_heads)

        lr = F.softplus(self.lr_proj(x).to(dtype) + self.base_lr_inv)
        lrs = lr.reshape(batch, seq_len, self.num_fw_heads, 3 * self.lr_dim_per_head).chunk(3, dim=-1)
        momentum = self.momentum_proj(x).to(dtype) if self.use_momentum else None

        initial = tuple(w.to(dtype) for w in self.initial_fast_weights())
        rule = ChunkRule(
            chunk_size=self.lact_chunk_size,
            row_norms=tuple(w.norm(dim=-1, keepdim=True) for w in initial),
            use_muon=self.use_muon,
            prenorm=self.ttt_prenorm,
        )
        out, fast_states = chunked_swiglu_ttt(
            fq, fk, fv, lrs, momentum, self._fast_state(state, dtype), seen, rule, want_states
        )
        out = self.ttt_norm(out)
        if self.learnable_ttt_scale:
            out = out * F.silu(self.ttt_scale_proj(x).to(dtype))[..., None]
        return out.reshape(x.shape), fast_states  # x.shape, not -1: a batch of no rows has no size to infer


class LaCTForCausalLM(FastWeightLM):
    """The release's LaCTForCausalLM: embeddings, LaCT blocks (attn_norm, attn, mlp_norm, mlp), norm, lm_head."""

    config_class = LaCTConfig

    def make_mixer(self, config: LaCTConfig, layer_idx: int) -> LaCTSWIGLULayer:
        return LaCTSWIGLULayer(config, layer_idx)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # linear and embedding weights: normal(0, initializer_range)
        for module in self.modules():
            if isinstance(module, LaCTSWIGLULayer):
                module.reset_fast_weights()
