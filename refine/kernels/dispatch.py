"""The one delta-rule entry point models call, choosing a kernel by device and request.

- CUDA with flash-linear-attention installed, and no state wanted except the final one (none at all,
  output_final_state=True, or positions all equal to T; never with state_fn): fla's Triton kernels,
  given the initial state and asked for the final one, so prefill and decoding run them: chunk for
  longer inputs; fused_recurrent for inputs of at most one chunk (gated rule: only without
  gradients, fla has no backward for it) and for the float32 delta rule, which fla's chunk kernel
  refuses. Gated calls that need gradients stay on our kernel where fla refuses its own gated chunk
  backward (Hopper GPUs with Triton 3.4.0 to 3.7.0 and no tilelang: fla issue #640).
- Otherwise (CPU, float64, states at positions before T, state_fn=True: positions chosen after the
  call): our PyTorch chunked kernel, with one chunk of exactly T tokens when T < CHUNK_SIZE (no
  padding, no loop: the teacher-forced rollouts), or the token-by-token loop for single tokens
  (decoding), where it does the fewest operations.

REFINE_KERNEL=torch|fla forces one family; forcing fla where it cannot serve the request is an error.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import SimpleNamespace

from collections.abc import Callable

import torch
from torch import Tensor

from refine.kernels.chunk import chunk_delta_rule, validate_delta_rule_inputs
from refine.kernels.recurrent import recurrent_delta_rule

logger = logging.getLogger(__name__)

CHUNK_SIZE = 64  # our chunked kernel's chunk length on CPU
SHORT_INPUT_TOKENS = 1  # at or below this length the per-token loop does fewer operations than a chunk
FLA_RECURRENT_TOKENS = 64  # fla's fused_recurrent is preferred for inputs up to one chunk
KERNEL_ENV = "REFINE_KERNEL"
_logged_choices: set[str] = set()


def _log_once(choice: str) -> None:
    if choice not in _logged_choices:
        _logged_choices.add(choice)
        logger.info("delta rule kernel: %s", choice)


def forced_kernel() -> str | None:
    """The family REFINE_KERNEL asks for, None when unset."""
    value = os.environ.get(KERNEL_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("torch", "fla"):
        raise ValueError(f"{KERNEL_ENV} must be 'torch' or 'fla' (or unset), got {value!r}")
    return value


@functools.lru_cache(maxsize=1)
def _fla_ops() -> SimpleNamespace | None:
    """fla's kernels, or None when the package (or triton) is not importable. Imported lazily: it is slow."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule as fla_chunk
        from fla.ops.delta_rule import fused_recurrent_delta_rule as fla_recurrent
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gated_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_gated_recurrent
    except ImportError:
        return None
    return SimpleNamespace(
        chunk=fla_chunk, recurrent=fla_recurrent, gated_chunk=fla_gated_chunk, gated_recurrent=fla_gated_recurrent
    )


@functools.lru_cache(maxsize=1)
def _fla_gated_backward_refused() -> bool:
    """Whether fla raises in its gated chunk backward on this machine, by fla's own test.

    Triton 3.4.0 to 3.7.0 miscompiles that kernel on Hopper GPUs (fla issue #640); fla then raises
    unless its tilelang backend is installed to replace the kernel.
    """
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # an fla without the guard
        return False
    broken_triton = IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
    return broken_triton and importlib.util.find_spec("tilelang") is None


def _wants_final_state_only(positions: Tensor | None, seq_len: int) -> bool:
    if positions is None:
        return True
    return positions.shape[1] == 1 and bool((positions == seq_len).all())


def select_kernel(
    q: Tensor,
    g: Tensor | None,
    positions: Tensor | None,
    needs_grad: bool,
    state_fn: bool = False,
) -> str:
    """Name of the kernel delta_rule runs for these inputs (see the module docstring for the rules)."""
    seq_len = q.shape[1]
    forced = forced_kernel()
    if forced != "torch":
        fla_reason = _request_unservable_reason(positions, seq_len, state_fn) or _fla_unusable_reason(q, seq_len)
        if fla_reason is None and g is not None and needs_grad and _fla_gated_backward_refused():
            fla_reason = ("fla refuses its gated chunk backward with this Triton on Hopper GPUs "
                          "(fla issue #640: Triton >= 3.7.1 or the tilelang package lifts it)")
        if fla_reason is None:
            return _fla_kernel_name(q.dtype, g is not None, seq_len, needs_grad)
        if forced == "fla":
            raise ValueError(f"{KERNEL_ENV}=fla but fla's kernels cannot serve this call: {fla_reason}")
    return "torch recurrent" if seq_len <= SHORT_INPUT_TOKENS else "torch chunk"


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    positions: Tensor | None = None,
    state_fn: bool = False,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Delta rule (gated when g is given); same contract as refine.kernels.chunk.chunk_delta_rule.

    With state_fn=True the second value is a function positions [B, P] -> states, usable after the
    call (the torch kernels serve it: fla's kernels keep no per-chunk states).
    With output_final_state=True (no positions, no state_fn) the second value is the state after all
    T tokens, [B, H, K, V] (float32 for half-precision inputs): fla's kernels serve it on CUDA, so the
    forwards that carry a state on (prefill, decoding) run them.

    q, k [B, T, H, K] (already l2-normalized); v [B, T, H, V]; beta, g [B, T, H]; initial_state [B, H, K, V];
    positions [B, P] in 0..T. Returns o [B, T, H, V] and, when positions is given, the states after
    positions[b, j] tokens as rows b * P + j of [B * P, H, K, V] (float32 for half-precision inputs).
    """
    validate_delta_rule_inputs(q, k, v, beta, g, initial_state, positions)
    if output_final_state and (positions is not None or state_fn):
        raise ValueError("output_final_state=True returns the final state alone: pass neither positions "
                         f"(got shape {None if positions is None else tuple(positions.shape)}) nor state_fn=True")
    inputs = (q, k, v, beta, g, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    kernel = select_kernel(q, g, positions, needs_grad, state_fn)
    _log_once(kernel)
    if kernel.startswith("fla"):
        return _fla_delta_rule(kernel, q, k, v, beta, g, scale, initial_state,
                               output_final_state or positions is not None)
    if output_final_state:  # the torch kernels' state function, asked for every row's end: no host sync
        o, states_at = _torch_delta_rule(kernel, q, k, v, beta, g, scale, initial_state, None, True)
        return o, states_at(None)
    return _torch_delta_rule(kernel, q, k, v, beta, g, scale, initial_state, positions, state_fn)


def _torch_delta_rule(
    kernel: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    scale: float | None,
    initial_state: Tensor | None,
    positions: Tensor | None,
    state_fn: bool,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Callable[[Tensor], Tensor]]:
    if kernel == "torch recurrent":
        return recurrent_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                    positions=positions, state_fn=state_fn)
    return chunk_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state, positions=positions,
                            state_fn=state_fn, chunk_size=min(CHUNK_SIZE, max(q.shape[1], 1)))


def _request_unservable_reason(positions: Tensor | None, seq_len: int, state_fn: bool) -> str | None:
    """Why fla's kernels, which return the final state only, cannot answer this request; None: they can."""
    if state_fn:
        return "states at positions chosen after the call are requested"
    if not _wants_final_state_only(positions, seq_len):
        return "states at positions other than T are requested"
    return None


def _fla_unusable_reason(q: Tensor, seq_len: int) -> str | None:
    """Why fla's kernels cannot run on these inputs here (device, dtype, installation); None: they can."""
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}, fla's kernels need CUDA"
    if seq_len == 0:
        return "the sequence is empty"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported by fla's kernels"
    if _fla_ops() is None:
        return "flash-linear-attention (with triton) is not importable"
    return None


def _fla_kernel_name(dtype: torch.dtype, gated: bool, seq_len: int, needs_grad: bool) -> str:
    short = seq_len <= FLA_RECURRENT_TOKENS
    if not gated:
        # fla's chunk delta rule rejects float32; its fused_recurrent has a backward and takes it.
        return "fla fused_recurrent_delta_rule" if dtype == torch.float32 or short else "fla chunk_delta_rule"
    # fla's gated fused_recurrent has no backward, so it only serves no-grad calls.
    return "fla fused_recurrent_gated_delta_rule" if short and not needs_grad else "fla chunk_gated_delta_rule"


def _fla_delta_rule(
    kernel: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    scale: float | None,
    initial_state: Tensor | None,
    want_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    ops = _fla_ops()
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if initial_state is not None:
        initial_state = initial_state.float()  # fla keeps states in float32
    common = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=want_final_state,
        use_qk_l2norm_in_kernel=False,
    )
    if kernel == "fla fused_recurrent_delta_rule":
        o, final = ops.recurrent(q, k, v, beta, **common)
    elif kernel == "fla chunk_delta_rule":
        o, final = ops.chunk(q, k, v, beta, **common)
    elif kernel == "fla fused_recurrent_gated_delta_rule":
        o, final = ops.gated_recurrent(q, k, v, g=g, beta=beta, **common)
    else:
        o, final = ops.gated_chunk(q, k, v, g, beta, **common)
    return o, (final if want_final_state else None)
