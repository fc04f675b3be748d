"""What the vLLM plugin can serve, checked without vLLM (run configs validate these anywhere).

`refine.config` refuses a `rollout.engine=vllm` run up front with `check_engine`; the engine applies the
same check before vLLM starts, and the plugin's layers the model checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refine.models.config import DeltaNetConfig, GatedDeltaNetConfig, ModelConfigBase
from refine_vllm.settings import VllmEngineConfig

if TYPE_CHECKING:  # refine.config imports this module: a runtime import would be circular
    from refine.config import RefineConfig

SERVED_MODEL_TYPES = ("delta_net", "gated_deltanet")

# The head dims vLLM's CPU delta-rule kernels are built for.
CPU_HEAD_DIMS = (64, 128)
CPU_CONV_SIZE = 4  # the one short-convolution width vLLM's CPU kernel takes


def servable_problems(config: DeltaNetConfig | GatedDeltaNetConfig) -> list[str]:
    """The fields vLLM's gated delta-rule layer cannot compute, each as 'field=value (why)'."""
    problems = []
    if not config.use_short_conv:
        problems.append("use_short_conv=False (vLLM's layer always convolves q, k and v)")
    if config.allow_neg_eigval:
        problems.append("allow_neg_eigval=True (vLLM's kernels compute beta = sigmoid(b) without the factor 2)")
    if isinstance(config, DeltaNetConfig):
        if config.qk_activation != "silu":
            problems.append(f"qk_activation={config.qk_activation!r} (only 'silu' is served)")
        if config.qk_norm != "l2":
            problems.append(f"qk_norm={config.qk_norm!r} (only 'l2' is served)")
        if not config.use_beta:
            problems.append("use_beta=False (only learned beta is served)")
    return problems


def check_servable(config: DeltaNetConfig | GatedDeltaNetConfig) -> None:
    """Reject the variants vLLM's gated delta-rule layer cannot compute, naming the field and value."""
    problems = servable_problems(config)
    if problems:
        raise ValueError(f"{config.model_type} model cannot be served by vLLM: " + "; ".join(problems))


def mixer_dims(config: DeltaNetConfig | GatedDeltaNetConfig) -> dict[str, int]:
    """Head counts and dims of the delta-rule state, as our mixers define them."""
    if isinstance(config, GatedDeltaNetConfig):
        head_k = config.head_dim
        return dict(num_k_heads=config.num_heads, num_v_heads=config.num_v_heads or config.num_heads,
                    head_k_dim=head_k, head_v_dim=int(head_k * config.expand_v))
    key_dim = round(config.hidden_size * config.expand_k)
    value_dim = round(config.hidden_size * config.expand_v)
    return dict(num_k_heads=config.num_heads, num_v_heads=config.num_heads,
                head_k_dim=key_dim // config.num_heads, head_v_dim=value_dim // config.num_heads)


def cpu_head_dim_problems(config: DeltaNetConfig | GatedDeltaNetConfig, prefix: str = "") -> list[str]:
    """Why vLLM's CPU delta-rule kernels cannot run this model's heads (they need equal key and value
    head dims of 64 or 128); the config fields the dims come from are named with `prefix`."""
    dims = mixer_dims(config)
    head_k, head_v = dims["head_k_dim"], dims["head_v_dim"]
    problems = [f"{name}={dims[name]}" for name in ("head_k_dim", "head_v_dim") if dims[name] not in CPU_HEAD_DIMS]
    if head_k != head_v:
        problems.append(f"head_k_dim={head_k} != head_v_dim={head_v}")
    if not problems:
        return []
    if isinstance(config, GatedDeltaNetConfig):
        fields = dict(head_dim=config.head_dim, expand_v=config.expand_v)
    else:
        fields = dict(hidden_size=config.hidden_size, num_heads=config.num_heads, expand_k=config.expand_k,
                      expand_v=config.expand_v)
    source = ", ".join(f"{prefix}{name}={value}" for name, value in fields.items())
    return [f"{', '.join(problems)} (from {source})"]


def cpu_conv_problems(config: DeltaNetConfig | GatedDeltaNetConfig, prefix: str = "") -> list[str]:
    """Why vLLM's CPU short-convolution kernel cannot run this model's convolutions (it takes width 4 only: other
    widths fail on every rollout with "Unexpected block size")."""
    if config.use_short_conv and config.conv_size != CPU_CONV_SIZE:
        return [f"{prefix}conv_size={config.conv_size}"]
    return []


def check_engine(model: ModelConfigBase, settings: VllmEngineConfig, refine: RefineConfig, seq_len: int,
                 cpu: str | None) -> None:
    """Refuse, naming the fields and values, a run the vLLM engine would refuse once started or fail on every
    rollout. `cpu` says why vLLM's CPU kernels will run (e.g. "train.device='cpu'"), None on a GPU."""
    if model.model_type not in SERVED_MODEL_TYPES:
        raise ValueError(f"rollout.engine='vllm' serves {' and '.join(SERVED_MODEL_TYPES)}, "
                         f"not model.model_type={model.model_type!r}")
    problems = [f"model.{problem}" for problem in servable_problems(model)]
    if problems:
        raise ValueError("rollout.engine='vllm' cannot serve " + "; ".join(problems))
    if cpu is not None:
        problems = cpu_head_dim_problems(model, prefix="model.") + cpu_conv_problems(model, prefix="model.")
        if settings.dtype != "bfloat16":
            problems.append(f"rollout.vllm.dtype={settings.dtype!r}")
        if problems:
            raise ValueError(f"rollout.engine='vllm' with {cpu}: vLLM's CPU delta-rule kernels need bfloat16, "
                             f"equal key and value head dims of 64 or 128 and short convolutions of width "
                             f"{CPU_CONV_SIZE}, got " + "; ".join(problems))
    if settings.behaviour_logprobs == "sampler" and (refine.top_p < 1.0 or refine.top_k > 0):
        raise ValueError(f"rollout.vllm.behaviour_logprobs='sampler' with refine.top_p={refine.top_p} / "
                         f"refine.top_k={refine.top_k}: vLLM would report the filtered distribution's log-probs; "
                         "use rollout.vllm.behaviour_logprobs='policy'")
    # A rollout starts at most rollout_len tokens before a document's end: prefix plus rollout fit in seq_len.
    if seq_len > settings.max_model_len:
        raise ValueError(f"data.seq_len={seq_len} exceeds rollout.vllm.max_model_len={settings.max_model_len} (a "
                         f"prefix plus its rollout is up to data.seq_len tokens)")
