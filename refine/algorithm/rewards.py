"""Self-supervised rollout rewards and the registry every reward (task rewards too) plugs into.

A reward maps a `RewardInputs` batch of N rollouts to a float tensor [N]. The self-supervised
rewards compare each k-token rollout with the document's ground-truth continuation:

    cosine  = mean over the k steps of cos(h_rollout, h_ground_truth), final-layer hidden
              states after the final norm; h at step i is the hidden state at the i-th rollout
              token's own position (after reading that token), for both sides;
    binary  = mean over the k steps of [rollout token == ground-truth token];
    hybrid  = cosine + binary.

Task rewards (QA F1, substring match, ...) register themselves with
`@register_reward(name, reads_text=True)` and read the text fields; only the service's reward
replicas (service.mode='disaggregated') decode rollouts into text. A run imports the modules named in
`refine.reward_modules` (`import_reward_modules`) before it looks its reward up, so a custom reward
is one such module away; `check_run_reward` is the one up-front check of `refine.reward`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from refine.models.state import is_integer_dtype

RewardFn = Callable[["RewardInputs"], Tensor]

_REGISTRY: dict[str, RewardFn] = {}
_READS_TEXT: set[str] = set()  # registered rewards that score decoded text

# The limit of every consumer of a reward name (ScoredBatch.reward_type, the HTTP API's reward_type).
MAX_REWARD_NAME_LENGTH = 128
# The task rewards shipped with the project, imported by name: the core library has no import-time
# dependency on the reward service, yet every run knows which of its rewards read text.
TASK_REWARD_MODULE = "reward.functions"


class MissingRewardInput(ValueError):
    """The rollouts lack a field the reward reads (RewardInputs.require): the caller's fault, not the reward's."""


class RewardInputs(BaseModel):
    """What a reward may read about N rollouts; each reward checks the fields it needs."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    rollout_tokens: Tensor | None = None  # [N, k] long
    ground_truth_tokens: Tensor | None = None  # [N, k] long
    rollout_hidden: Tensor | None = None  # [N, k, D]
    ground_truth_hidden: Tensor | None = None  # [N, k, D]
    rollout_texts: list[str] | None = None  # [N] decoded rollouts (task rewards)
    reference_texts: list[list[str]] | None = None  # [N] acceptable answers per rollout
    # N itself, for rollouts given without any field (a reward that reads none, such as a constant baseline).
    count: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> RewardInputs:
        sizes: dict[str, int] = {} if self.count is None else {"count": self.count}
        for name in ("rollout_tokens", "ground_truth_tokens", "rollout_hidden", "ground_truth_hidden"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            want = 2 if name.endswith("tokens") else 3
            if value.dim() != want:
                raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
            if name.endswith("tokens") and not is_integer_dtype(value.dtype):
                raise ValueError(f"{name} must hold integer token ids, got dtype {value.dtype}")
            if name.endswith("hidden"):
                _check_finite(name, value)
            sizes[name] = value.shape[0]
        for name in ("rollout_texts", "reference_texts"):
            value = getattr(self, name)
            if value is not None:
                sizes[name] = len(value)
        if len(set(sizes.values())) > 1:
            raise ValueError(f"all fields must describe the same number of rollouts, got sizes {sizes}")
        return self

    @property
    def num_rollouts(self) -> int:
        if self.count is not None:
            return self.count
        for name in ("rollout_tokens", "ground_truth_tokens", "rollout_hidden", "ground_truth_hidden"):
            value = getattr(self, name)
            if value is not None:
                return value.shape[0]
        for value in (self.rollout_texts, self.reference_texts):
            if value is not None:
                return len(value)
        return 0

    def require(self, *names: str) -> None:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise MissingRewardInput(f"this reward needs the fields {missing}, which are missing")


def register_reward(name: str, *, reads_text: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function to the registry under `name` (unique).

    `reads_text`: the reward scores `rollout_texts` / `reference_texts`, which only a reward replica
    with a tokenizer (service.mode='disaggregated') provides; the others read tokens and hidden states.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    # Checked here: a longer name registers but every scored batch and HTTP request would refuse it.
    if len(name) > MAX_REWARD_NAME_LENGTH:
        raise ValueError(f"reward name must be at most {MAX_REWARD_NAME_LENGTH} characters, got {len(name)}: "
                         f"{name[:40]!r}...")
    if not isinstance(reads_text, bool):
        raise ValueError(f"reads_text of reward {name!r} must be a bool, got {reads_text!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise ValueError(f"reward {name!r} must be a callable (RewardInputs -> Tensor), got {type(fn).__name__}")
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        if reads_text:
            _READS_TEXT.add(name)
        else:
            _READS_TEXT.discard(name)
        return fn

    return decorator


def unregister_reward(name: str) -> None:
    """Remove a reward (plugins being reloaded, tests)."""
    _REGISTRY.pop(name, None)
    _READS_TEXT.discard(name)


def reward_reads_text(name: str) -> bool:
    """Whether the registered reward `name` scores decoded text; ValueError for an unknown name."""
    get_reward(name)
    return name in _READS_TEXT


def import_reward_modules(modules: Sequence[str], setting: str = "refine.reward_modules") -> None:
    """Import each module of `refine.reward_modules`, which registers its rewards with `register_reward`.

    Importing a module twice is harmless (Python keeps it); one that fails is a ValueError naming
    `setting` (where the module was named) and the module.
    """
    for module in modules:
        if not isinstance(module, str) or not module:
            raise ValueError(f"{setting}: a module name must be a non-empty string, got {module!r}")
        try:
            importlib.import_module(module)
        except Exception as exc:  # a plugin may fail in any way: say which one, and where it was named
            raise ValueError(f"{setting}: cannot import {module!r}: {type(exc).__name__}: {exc}") from exc


def check_run_reward(reward: str, modules: Sequence[str] = (), *, decodes_text: bool) -> None:
    """The up-front check of a run's reward, before any training: import `refine.reward_modules`, then
    refuse an unknown `refine.reward` (listing the registered ones) and, where the run has no text
    decoding (`decodes_text` False: the local loop, posttrain, the colocated fused step), a text reward."""
    importlib.import_module(TASK_REWARD_MODULE)
    import_reward_modules(modules)
    if reward not in _REGISTRY:
        raise ValueError(f"refine.reward={reward!r} is not a registered reward; registered: {available_rewards()} "
                         f"(a custom reward's module goes in refine.reward_modules)")
    if reward_reads_text(reward) and not decodes_text:
        raise ValueError(
            f"refine.reward={reward!r} scores decoded text, which only the reward replicas of "
            f"service.mode='disaggregated' produce; the local loop, posttrain and the colocated fused step score "
            f"tokens and hidden states: {[name for name in available_rewards() if name not in _READS_TEXT]}"
        )


def get_reward(name: str) -> RewardFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


class RewardOutputError(ValueError):
    """A reward function returned something other than N finite real scores: a fault of the function, not of the
    rollouts it was given."""


def compute_reward(name: str, inputs: RewardInputs) -> Tensor:
    """Run the registered reward `name` and check it returned N finite scores (RewardOutputError otherwise)."""
    scores = get_reward(name)(inputs)
    if not isinstance(scores, Tensor) or scores.shape != (inputs.num_rollouts,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise RewardOutputError(f"reward {name!r} must return a tensor of shape [{inputs.num_rollouts}], got {shape}")
    if scores.is_complex():
        raise RewardOutputError(f"reward {name!r} must return real scores, got dtype {scores.dtype}")
    if not scores.is_floating_point():  # a match count, a bool per rollout: scores all the same, in float32
        scores = scores.to(torch.float32)
    _check_finite(f"reward {name!r} output", scores, RewardOutputError)
    return scores


def cosine_reward(rollout_hidden: Tensor, ground_truth_hidden: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over k steps of the cosine similarity of hidden states: [N, k, D] x2 -> [N]."""
    _check_same_shape("rollout_hidden", rollout_hidden, "ground_truth_hidden", ground_truth_hidden, dims=3)
    _check_finite("rollout_hidden", rollout_hidden)
    _check_finite("ground_truth_hidden", ground_truth_hidden)
    dtype = torch.promote_types(torch.promote_types(rollout_hidden.dtype, ground_truth_hidden.dtype), torch.float32)
    rollout, truth = _unit_scaled(rollout_hidden.to(dtype)), _unit_scaled(ground_truth_hidden.to(dtype))
    cos = F.cosine_similarity(rollout, truth, dim=-1, eps=eps)
    return cos.mean(dim=-1)


def _unit_scaled(hidden: Tensor) -> Tensor:
    """Each vector (last dim) scaled by a power of two that brings its largest |value| into [0.5, 1).

    The norm inside the cosine squares the values, which overflows to inf for large finite ones
    (1e200 in float64, 1e20 in float32) and turned the cosine into 0. A power of two scales exactly,
    so ordinary vectors give bit-identical cosines. The scale is a detached factor (torch.ldexp of the
    input itself has no usable gradient), and as the cosine does not depend on it, gradients stay the
    true ones. Zero vectors stay zero.
    """
    _, exponent = torch.frexp(hidden.detach().abs().amax(dim=-1, keepdim=True))
    # A subnormal vector's factor is past the dtype's range (2**1074 for float64): it is applied as two factors.
    # A capped single factor left float64 vectors below ~1e-300 under the cosine's eps, and their cosine wrong.
    largest = math.frexp(torch.finfo(hidden.dtype).max)[1] - 1
    shift = -exponent
    first = shift.clamp(max=largest)
    one = torch.ones_like(exponent, dtype=hidden.dtype)
    # In place on the first product: one temporary of the vectors' size, as with a single factor.
    return (hidden * torch.ldexp(one, first)).mul_(torch.ldexp(one, shift - first))


def binary_reward(rollout_tokens: Tensor, ground_truth_tokens: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fraction of the k rollout tokens equal to the ground truth: [N, k] x2 -> [N] of `dtype`."""
    _check_same_shape("rollout_tokens", rollout_tokens, "ground_truth_tokens", ground_truth_tokens, dims=2)
    for name, value in (("rollout_tokens", rollout_tokens), ("ground_truth_tokens", ground_truth_tokens)):
        if not is_integer_dtype(value.dtype):
            raise ValueError(f"{name} must hold integer token ids, got dtype {value.dtype}")
    return (rollout_tokens == ground_truth_tokens).to(dtype).mean(dim=-1)


def hybrid_reward(
    rollout_tokens: Tensor, ground_truth_tokens: Tensor, rollout_hidden: Tensor, ground_truth_hidden: Tensor
) -> Tensor:
    """cosine + binary, each a mean over the k steps: in [-1, 2]."""
    cosine = cosine_reward(rollout_hidden, ground_truth_hidden)
    return cosine + binary_reward(rollout_tokens, ground_truth_tokens, cosine.dtype)  # float64 hidden: 1/3 exactly


@register_reward("cosine")
def _cosine(inputs: RewardInputs) -> Tensor:
    inputs.require("rollout_hidden", "ground_truth_hidden")
    return cosine_reward(inputs.rollout_hidden, inputs.ground_truth_hidden)


@register_reward("binary")
def _binary(inputs: RewardInputs) -> Tensor:
    inputs.require("rollout_tokens", "ground_truth_tokens")
    return binary_reward(inputs.rollout_tokens, inputs.ground_truth_tokens)


@register_reward("hybrid")
def _hybrid(inputs: RewardInputs) -> Tensor:
    inputs.require("rollout_tokens", "ground_truth_tokens", "rollout_hidden", "ground_truth_hidden")
    return hybrid_reward(
        inputs.rollout_tokens, inputs.ground_truth_tokens, inputs.rollout_hidden, inputs.ground_truth_hidden
    )


# The paper's code names the cosine reward "cosine_similarity"; accept its configs unchanged.
register_reward("cosine_similarity")(_cosine)


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor, dims: int) -> None:
    for name, value in ((name_a, a), (name_b, b)):
        if not isinstance(value, Tensor) or value.dim() != dims:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a {dims}-D tensor, got {shape}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def _check_finite(name: str, value: Tensor, error: type[ValueError] = ValueError) -> None:
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise error(f"{name} contains NaN or Inf")
