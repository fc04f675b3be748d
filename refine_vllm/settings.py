"""Settings of the vLLM rollout engine: plain pydantic, importable without vLLM (config validation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class VllmEngineConfig(BaseModel):
    """Settings of the vLLM engine (`rollout.vllm` in a run config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="vLLM's compute dtype; its CPU delta-rule kernels need bfloat16")
    max_model_len: int = Field(32768, ge=16, description="longest prompt + generation, in tokens")
    max_num_seqs: int = Field(256, ge=1, description="sequences decoded together")
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="tokens per scheduler step; long prompts are prefilled in chunks of this size")
    enable_prefix_caching: bool = Field(True, description="reuse states of shared prefixes (block-aligned); "
                                                          "off on CPU when multiprocessing")
    state_cache_bytes: int = Field(1 << 30, ge=1 << 20, description="CPU memory for the recurrent-state slots")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="GPU share vLLM may take (GPU only)")
    enforce_eager: bool = Field(True, description="no CUDA graphs / compilation (faster start, CPU needs it)")
    behaviour_logprobs: Literal["sampler", "policy"] = Field(
        "sampler", description="vLLM's sampling log-probs, or our model's from the teacher-forced pass (also what "
                               "'sampler' gives for a model with an EOS id: vLLM's exclude the suppressed EOS)")
    multiprocessing: bool = Field(False, description="run vLLM's engine core in its own process")
    weights_dir: str | None = Field(
        None, description="directory the engine owns for the checkpoints vLLM reads (start; refreshes across "
                          "processes); None: a temporary directory")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="passed to vllm.LLM as is")

    @model_validator(mode="after")
    def _batch_budget(self) -> "VllmEngineConfig":
        budget = self.max_num_batched_tokens
        if budget is not None and budget < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={budget} must be >= max_num_seqs={self.max_num_seqs}")
        return self
