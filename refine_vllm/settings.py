"""Settings of the vLLM rollout engine: plain pydantic, importable without vLLM (config validation)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from refine.files import file_name_part
from refine.models.config import Strict


class VllmEngineConfig(Strict):
    """Settings of the vLLM engine (`rollout.vllm` in a run config)."""

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
        None, min_length=1, description="directory for the checkpoints vLLM reads (start; refreshes across processes), "
                          "shared by a run's workers, a folder each, removed when a worker stops or the run "
                          "kills it; None: a temporary directory per engine")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="passed to vllm.LLM as is")

    @model_validator(mode="after")
    def _batch_budget(self) -> "VllmEngineConfig":
        budget = self.max_num_batched_tokens
        if budget is not None and budget < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={budget} must be >= max_num_seqs={self.max_num_seqs}")
        return self


def staging_prefix(owner: str) -> str:
    """How the names of engine `owner`'s staging folders inside `weights_dir` begin. "~" ends the owner
    (it appears in no sanitized owner), so one owner's prefix never matches another owner's folders."""
    return f"engine-{file_name_part(owner)}~"


def remove_staging(weights_dir: str | Path, owner: str) -> int:
    """Delete the staging folders that engine `owner` left in `weights_dir` (its process was killed before
    it could); returns how many there were."""
    removed = 0
    for path in Path(weights_dir).glob(f"{staging_prefix(owner)}*"):
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed
