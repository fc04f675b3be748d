"""Model configs: the same field names and defaults as the public releases' config.json.

Unknown keys in a config.json (fla's fuse_* switches, transformers' bookkeeping) are kept as extras
so that a directory loaded and saved again still loads into the original library's class; the
extras that would change the network (UNSUPPORTED_FLA_FIELDS) are refused instead, and so is an
unknown key that is a near miss of a field (a typo), unless a library writes it (LIBRARY_KEYS).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError


# fla config fields whose non-null value changes the network, which our models do not build.
UNSUPPORTED_FLA_FIELDS: dict[str, str] = {
    "attn": "hybrid models with softmax-attention layers",
    "attnres_block_size": "attention residuals: learned attention over earlier layers' outputs",
}


# Keys that transformers (4.x and 5.x), fla and the LaCT release write into config.json besides our fields.
# Some are a letter or two from a field (sep_token_id / pad_token_id, fuse_linear_cross_entropy /
# fuse_cross_entropy), so they are never taken for a typo.
LIBRARY_KEYS = frozenset({
    # transformers' PretrainedConfig
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "transformers_version", "architectures",
    "dtype", "torch_dtype", "use_bfloat16", "tf_legacy_loss", "torchscript", "pruned_heads", "return_dict",
    "output_hidden_states", "output_attentions", "output_scores", "return_dict_in_generate", "use_cache",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "sep_token_id", "decoder_start_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
    # fla's kernel switches and other fields not ours (see also UNSUPPORTED_FLA_FIELDS)
    "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "norm_first",
    "elementwise_affine",
})


# Upper bounds of the float fields: far past every released config (fla: initializer_range 0.02, norm_eps 1e-6
# or 1e-5, expand_k 0.5 or 1, expand_v 1 or 2; the LaCT release: initializer_range 0.006) and short of what
# breaks float32 / bfloat16 work (both top out at 3.4e38).
# initializer_range, the std of every linear and embedding weight: a layer of width D scales its input by about
# std * sqrt(D), so at 1 a 256-wide model starts with logits of ~70 (a loss of ~45 nats), and at 1e10 the
# squares inside RMSNorm overflow: every norm outputs 0 and the gradients are NaN.
MAX_INITIALIZER_RANGE = 1.0
# norm_eps is added to each activation vector's mean square before rsqrt, only to keep a zero vector finite: at 1
# it outweighs the mean square of unit-scale activations, so the norm shrinks them instead of normalising them
# (a 256-wide model's first logits are 50 times smaller than at 1e-6), and past 3.4e38 (inf in float32) every
# norm outputs zeros.
MAX_NORM_EPS = 1.0
# expand_k / expand_v: key and value widths as multiples of hidden_size (head_dim). 16, 8 times fla's largest,
# already gives a 2048-wide layer projections of 2048 x 32768 weights; hidden_size * 1e306 is inf, no width.
MAX_EXPAND = 16.0


def refuse_bool_for_number(value: Any, annotation: Any) -> Any:
    """value, unless it is a boolean given for an int or float field: pydantic's lax mode reads
    `steps: true` as 1 and `lr: false` as 0.0, a slip rather than a setting."""
    options = set(get_args(annotation) or (annotation,))  # int | float | None -> {int, float, NoneType}
    if isinstance(value, bool) and options & {int, float} and bool not in options:
        raise ValueError(f"must be a number, got the boolean {value}")
    return value


class Strict(BaseModel):
    """The base of every settings model: unknown keys, inf and NaN (they pass bounds such as gt=0 and fail late, far
    from the setting: norm_eps=inf turns every activation into NaN) and booleans for numbers are refused, also when
    a field is assigned after validation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_for_number(value, cls.model_fields[info.field_name].annotation)


class ModelConfigBase(Strict):
    # Extras: fla's config.json keys this model does not read are kept. No protected namespaces: pydantic before
    # 2.10 warned at import that model_type (config.json's own key) starts with its reserved "model_".
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_type: str
    vocab_size: int = Field(32000, gt=0)
    hidden_size: int = Field(2048, gt=0)
    num_hidden_layers: int = Field(24, gt=0)
    num_heads: int = Field(16, gt=0)
    hidden_ratio: int | None = Field(4, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    hidden_act: Literal["swish"] = "swish"
    norm_eps: float = Field(1e-6, gt=0, le=MAX_NORM_EPS)
    tie_word_embeddings: bool = False
    initializer_range: float = Field(0.02, gt=0, le=MAX_INITIALIZER_RANGE)
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

    @model_validator(mode="after")
    def _no_misspelt_fields(self) -> "ModelConfigBase":
        # An extra is kept unread: a misspelt field (hiden_size) would leave the field at its default unnoticed.
        errors = []
        for key, value in (self.model_extra or {}).items():
            if key in LIBRARY_KEYS:
                continue
            match = difflib.get_close_matches(key, type(self).model_fields, n=1, cutoff=0.8)
            if match:
                problem = PydanticCustomError("misspelt_field", "not a field of {model_type}: did you mean {field}?",
                                              {"model_type": self.model_type, "field": match[0]})
                errors.append(InitErrorDetails(type=problem, loc=(key,), input=value))
        if errors:  # located at the key, so that the message names model.<key> and its value
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json")


class DeltaNetConfig(ModelConfigBase):
    """flash-linear-attention's DeltaNetConfig fields."""

    model_type: Literal["delta_net"] = "delta_net"
    # Kept so that fla's config.json reads and writes back unchanged; not read here. attn_mode picks one of fla's
    # kernels for the same recurrence (the GPU path picks its own); fla's layer ignores use_output_norm (its
    # output is always normalized, as here).
    attn_mode: Literal["chunk", "fused_recurrent"] = "chunk"
    expand_k: float = Field(1.0, gt=0, le=MAX_EXPAND)
    expand_v: float = Field(1.0, gt=0, le=MAX_EXPAND)
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
            # fla's DeltaNet layer rounds and accepts what math.isclose calls an integer (100 * 1.1 is
            # 110.00000000000001): the same test here, and the same round() in DeltaNetMixer.
            if not math.isclose(dim, round(dim)) or round(dim) % self.num_heads:
                raise ValueError(
                    f"hidden_size * {name} = {dim} must be an integer divisible by num_heads={self.num_heads}"
                )
        return self


class GatedDeltaNetConfig(ModelConfigBase):
    """flash-linear-attention's GatedDeltaNetConfig fields."""

    model_type: Literal["gated_deltanet"] = "gated_deltanet"
    attn_mode: Literal["chunk", "fused_recurrent"] = "chunk"  # fla's kernel choice, not read here (see DeltaNetConfig)
    expand_v: float = Field(2.0, gt=0, le=MAX_EXPAND)
    use_gate: bool = True
    output_gate_activation: Literal["swish", "silu", "sigmoid"] = "swish"  # silu is swish's other name
    use_short_conv: bool = True
    conv_size: int = Field(4, ge=2)
    head_dim: int = Field(256, gt=0)
    num_heads: int = Field(6, gt=0)
    num_hidden_layers: int = Field(21, gt=0)  # fla's GatedDeltaNetConfig default (DeltaNet's is 24)
    num_v_heads: int | None = Field(None, gt=0)
    allow_neg_eigval: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> "GatedDeltaNetConfig":
        v_heads = self.num_v_heads or self.num_heads
        if v_heads % self.num_heads:
            raise ValueError(f"num_v_heads={v_heads} must be a multiple of num_heads={self.num_heads}")
        # fla's GatedDeltaNet layer truncates with int() and accepts what math.isclose(rel_tol=1e-5)
        # calls an integer (its second test, on num_v_heads times this, follows from this one): the
        # same test here, and the same int() in GatedDeltaNetMixer.
        head_v = self.head_dim * self.expand_v
        if not math.isclose(head_v, int(head_v), rel_tol=1e-5):
            raise ValueError(f"head_dim * expand_v = {head_v} must be an integer")
        return self
