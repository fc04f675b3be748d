"""Model configs: the same field names and defaults as the public releases' config.json.

Unknown keys in a config.json (fla's fuse_* switches, transformers' bookkeeping) are kept as extras
so that a directory loaded and saved again still loads into the original library's class; the
extras that would change the network (UNSUPPORTED_FLA_FIELDS) are refused instead.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# fla config fields whose non-null value changes the network, which our models do not build.
UNSUPPORTED_FLA_FIELDS: dict[str, str] = {
    "attn": "hybrid models with softmax-attention layers",
    "attnres_block_size": "attention residuals: learned attention over earlier layers' outputs",
}


class ModelConfigBase(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    model_type: str
    vocab_size: int = Field(32000, gt=0)
    hidden_size: int = Field(2048, gt=0)
    num_hidden_layers: int = Field(24, gt=0)
    num_heads: int = Field(16, gt=0)
    hidden_ratio: int | None = Field(4, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    hidden_act: Literal["swish"] = "swish"
    norm_eps: float = Field(1e-6, gt=0)
    tie_word_embeddings: bool = False
    initializer_range: float = Field(0.02, gt=0)
    max_position_embeddings: int = 2048
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    @model_validator(mode="after")
    def _no_unsupported_extras(self) -> "ModelConfigBase":
        # Extras are kept unread, so an fla field that changes the network must not pass as one.
        for name, meaning in UNSUPPORTED_FLA_FIELDS.items():
            value = (self.model_extra or {}).get(name)
            if value is not None:
                raise ValueError(f"{name}={value!r} is not supported ({meaning}); only {name}=null is")
        return self

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json")


class DeltaNetConfig(ModelConfigBase):
    """flash-linear-attention's DeltaNetConfig fields."""

    model_type: Literal["delta_net"] = "delta_net"
    attn_mode: Literal["chunk", "fused_recurrent"] = "chunk"
    expand_k: float = Field(1.0, gt=0)
    expand_v: float = Field(1.0, gt=0)
    use_gate: bool = False
    use_short_conv: bool = True
    allow_neg_eigval: bool = False
    conv_size: int = Field(4, ge=2)
    use_beta: bool = True
    use_output_norm: bool = True
    qk_norm: Literal["l2", "sum"] = "l2"
    qk_activation: Literal["silu", "relu", "elu", "identity"] = "silu"

    @model_validator(mode="after")
    def _dims_divide(self) -> "DeltaNetConfig":
        for name, ratio in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            dim = self.hidden_size * ratio
            if dim != int(dim) or int(dim) % self.num_heads:
                raise ValueError(
                    f"hidden_size * {name} = {dim} must be an integer divisible by num_heads={self.num_heads}"
                )
        return self


class GatedDeltaNetConfig(ModelConfigBase):
    """flash-linear-attention's GatedDeltaNetConfig fields."""

    model_type: Literal["gated_deltanet"] = "gated_deltanet"
    attn_mode: Literal["chunk", "fused_recurrent"] = "chunk"
    expand_v: float = Field(2.0, gt=0)
    use_gate: bool = True
    output_gate_activation: Literal["swish", "silu", "sigmoid"] = "swish"  # silu is swish's other name
    use_short_conv: bool = True
    conv_size: int = Field(4, ge=2)
    head_dim: int = Field(256, gt=0)
    num_heads: int = Field(6, gt=0)
    num_v_heads: int | None = Field(None, gt=0)
    allow_neg_eigval: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> "GatedDeltaNetConfig":
        v_heads = self.num_v_heads or self.num_heads
        if v_heads % self.num_heads:
            raise ValueError(f"num_v_heads={v_heads} must be a multiple of num_heads={self.num_heads}")
        head_v = self.head_dim * self.expand_v
        if head_v != int(head_v):
            raise ValueError(f"head_dim * expand_v = {head_v} must be an integer")
        return self
