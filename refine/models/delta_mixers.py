"""DeltaNet and Gated DeltaNet token mixers (fla's `DeltaNet` / `GatedDeltaNet` layers, same names).

Layer state: `recurrent` [B, H, K, V] plus, with short convolutions, `conv_q`, `conv_k`, `conv_v`
[B, conv_size - 1, dim]: the last pre-convolution inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refine.kernels.dispatch import delta_rule
from refine.models.common import GatedRMSNorm, RMSNorm, ShortConvolution, short_convolutions
from refine.models.config import DeltaNetConfig, GatedDeltaNetConfig

CONV_STATE_NAMES = ("conv_q", "conv_k", "conv_v")


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps), the normalization fla's kernels apply to q and k: computed in at least
    float32, as fla's kernels compute it for half-precision inputs, and returned in x's dtype."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class _QKVMixer(nn.Module):
    """Projections, optional short convolutions, the delta rule and the output norm/projection."""

    key_dim: int
    value_dim: int
    head_k_dim: int
    head_v_dim: int
    num_heads: int  # heads of the recurrent state (value heads)

    @property
    def state_names(self) -> frozenset[str]:
        """The keys of this mixer's layer state."""
        return frozenset(("recurrent", *(CONV_STATE_NAMES if self.use_short_conv else ())))

    def _build_common(self, hidden_size: int, conv_size: int, use_short_conv: bool, use_gate: bool,
                      norm_eps: float, qk_conv_activation: str | None, gate_activation: str = "swish") -> None:
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, activation=qk_conv_activation)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, activation=qk_conv_activation)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, activation="silu")
        self.use_gate = use_gate
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm: nn.Module = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation=gate_activation)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def _qkv(self, x: Tensor, state: dict | None, no_conv_qk_activation: str | None,
             extra: tuple[nn.Linear, ...] = ()) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Callable[[Tensor], dict]]:
        """q, k, v after projections and convolutions, the `extra` projections of x, and a function
        positions -> convolution caches.

        All projections run as one matmul over concatenated weights, and the three convolutions as
        one over concatenated channels (the parameters keep fla's separate names): a third of the
        operations, which is most of the cost of the few-token forwards of decoding and teacher forcing.
        """
        projections = (self.q_proj, self.k_proj, self.v_proj, *extra)
        weight = torch.cat([projection.weight for projection in projections]).to(x.dtype)
        projected = F.linear(x, weight)
        sizes = [self.key_dim, self.key_dim, self.value_dim]
        # One split, not slices: a split's backward concatenates the gradients, while each slice's
        # backward zero-fills a gradient the size of `projected` (a twentieth of an NTP step at 4K).
        qkv, *extra_outputs = projected.split([sum(sizes), *(projection.out_features for projection in extra)], dim=-1)
        padded: Tensor | None = None
        if self.use_short_conv:
            cache = None if state is None else torch.cat([state[name] for name in CONV_STATE_NAMES], dim=-1)
            qkv, padded = short_convolutions((self.q_conv1d, self.k_conv1d, self.v_conv1d), qkv, cache)
            q, k, v = qkv.split(sizes, dim=-1)
        else:
            q, k, v = qkv.split(sizes, dim=-1)
            if no_conv_qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)

        def conv_states_at(positions: Tensor) -> dict:
            if padded is None:
                return {}
            caches = self.q_conv1d.cache_at(padded, positions).split(sizes, dim=-1)
            return {name: cache.contiguous() for name, cache in zip(CONV_STATE_NAMES, caches)}

        return q, k, v, extra_outputs, conv_states_at

    @staticmethod
    def _states_at(recurrent_at: Callable, conv_states_at: Callable) -> Callable[[Tensor], dict]:
        return lambda positions: {"recurrent": recurrent_at(positions), **conv_states_at(positions)}

    @staticmethod
    def _delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: dict | None,
                    want_states: bool, final_only: bool) -> tuple[Tensor, Callable[[Tensor | None], Tensor] | None]:
        """o and, when states are wanted, a function positions -> recurrent states.

        final_only: only states_at(None) will be asked, so the kernel is asked for the final state
        alone, which fla's kernels return (the torch kernels serve every request).
        """
        initial_state = None if state is None else state["recurrent"]
        if not (want_states and final_only):
            return delta_rule(q, k, v, beta, g, initial_state=initial_state, state_fn=want_states)
        o, final = delta_rule(q, k, v, beta, g, initial_state=initial_state, output_final_state=True)

        def final_state(positions: Tensor | None) -> Tensor:
            if positions is not None:
                raise ValueError("this forward ran with final_only=True: only the final state (positions=None) "
                                 f"is kept, got positions of shape {tuple(positions.shape)}")
            return final

        return o, final_state

    def _gate_projection(self) -> tuple[nn.Linear, ...]:
        return (self.g_proj,) if self.use_gate else ()

    def _output(self, o: Tensor, gate: Tensor | None) -> Tensor:
        if gate is not None:
            o = self.o_norm(o, gate.unflatten(-1, (-1, self.head_v_dim)))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2))


class DeltaNetMixer(_QKVMixer):
    def __init__(self, config: DeltaNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.qk_activation = config.qk_activation
        self.qk_norm = config.qk_norm
        self.use_beta = config.use_beta
        self.allow_neg_eigval = config.allow_neg_eigval
        self.num_heads = config.num_heads
        self.key_dim = round(config.hidden_size * config.expand_k)
        self.value_dim = round(config.hidden_size * config.expand_v)
        self.head_k_dim = self.key_dim // config.num_heads
        self.head_v_dim = self.value_dim // config.num_heads
        if self.use_beta:
            self.b_proj = nn.Linear(config.hidden_size, config.num_heads, bias=False)
        self._build_common(
            config.hidden_size, config.conv_size, config.use_short_conv, config.use_gate, config.norm_eps,
            qk_conv_activation="silu" if config.qk_activation == "silu" else None,
        )

    def forward(self, x: Tensor, state: dict | None, want_states: bool,
                final_only: bool = False) -> tuple[Tensor, Callable | None]:
        extra = ((self.b_proj,) if self.use_beta else ()) + self._gate_projection()
        q, k, v, extra_outputs, conv_states_at = self._qkv(x, state, self.qk_activation, extra)
        beta_logits = extra_outputs.pop(0) if self.use_beta else None
        gate = extra_outputs.pop(0) if self.use_gate else None
        q, k = (t.unflatten(-1, (-1, self.head_k_dim)) for t in (q, k))
        v = v.unflatten(-1, (-1, self.head_v_dim))
        if self.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif self.qk_activation == "elu":
            q, k = F.elu(q) + 1, F.elu(k) + 1
        if self.qk_norm == "l2":
            q, k = l2_normalize(q), l2_normalize(k)
        else:  # sum norm: divide by the L1 norm
            q = q / q.abs().sum(-1, keepdim=True).clamp_min(1e-6)
            k = k / k.abs().sum(-1, keepdim=True).clamp_min(1e-6)
        beta = beta_logits.sigmoid() if beta_logits is not None else x.new_ones(x.shape[:2] + (self.num_heads,))
        if self.allow_neg_eigval:
            beta = beta * 2
        o, recurrent_at = self._delta_rule(q, k, v, beta, None, state, want_states, final_only)
        return self._output(o, gate), self._states_at(recurrent_at, conv_states_at) if want_states else None


class GatedDeltaNetMixer(_QKVMixer):
    def __init__(self, config: GatedDeltaNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.allow_neg_eigval = config.allow_neg_eigval
        self.num_qk_heads = config.num_heads
        self.num_heads = config.num_v_heads or config.num_heads
        self.head_k_dim = config.head_dim
        self.head_v_dim = int(config.head_dim * config.expand_v)
        self.key_dim = self.num_qk_heads * self.head_k_dim
        self.value_dim = self.num_heads * self.head_v_dim
        self.a_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        # Same initialization as fla: A ~ U(0, 16); dt log-uniform in [1e-3, 0.1] stored as softplus^-1.
        self.A_log = nn.Parameter(torch.empty(self.num_heads).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        # fla marks these two `_no_weight_decay`; nothing here reads such a mark: the optimizer decays every
        # parameter, as the paper's code does (refine.step.make_optimizer).
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self._build_common(
            config.hidden_size, config.conv_size, config.use_short_conv, config.use_gate, config.norm_eps,
            qk_conv_activation="silu", gate_activation=config.output_gate_activation,
        )

    def forward(self, x: Tensor, state: dict | None, want_states: bool,
                final_only: bool = False) -> tuple[Tensor, Callable | None]:
        q, k, v, extra_outputs, conv_states_at = self._qkv(x, state, "silu",
                                                           (self.a_proj, self.b_proj) + self._gate_projection())
        decay_logits, beta_logits = extra_outputs[:2]
        gate = extra_outputs[2] if self.use_gate else None
        q, k = (l2_normalize(t.unflatten(-1, (-1, self.head_k_dim))) for t in (q, k))
        v = v.unflatten(-1, (-1, self.head_v_dim))
        if self.num_heads != self.num_qk_heads:  # grouped value attention: value head i reads qk head i // group
            group = self.num_heads // self.num_qk_heads
            q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
        # The log-decay is computed in at least float32: it is summed over whole chunks in the kernel.
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        log_decay = -self.A_log.to(gate_dtype).exp() * F.softplus(decay_logits.to(gate_dtype) + self.dt_bias.to(gate_dtype))
        beta = beta_logits.sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2
        o, recurrent_at = self._delta_rule(q, k, v, beta, log_decay, state, want_states, final_only)
        return self._output(o, gate), self._states_at(recurrent_at, conv_states_at) if want_states else None
