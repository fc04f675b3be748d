"""A score request's validated rollouts as the reward functions' inputs: shapes checked, hidden states in its dtype."""

from typing import Any

import torch
from fastapi.exceptions import RequestValidationError

from refine.algorithm.rewards import RewardInputs
from reward.http_errors import MAX_REPORTED_ERRORS, error_detail

_SEQUENCE_FIELDS = ("rollout_tokens", "ground_truth_tokens", "rollout_hidden", "ground_truth_hidden")
_ROLLOUT_FIELDS = (*_SEQUENCE_FIELDS, "rollout_text", "reference_texts")


def shape_errors(rollouts: list[Any]) -> list[dict[str, Any]]:
    """Every rollout must give the same fields, all with the same k; hidden vectors one size."""
    errors: list[dict[str, Any]] = []
    present = {name for name in _ROLLOUT_FIELDS if getattr(rollouts[0], name) is not None}
    steps: tuple[int, str] | None = None  # (k, where it was first seen)
    width: tuple[int, str] | None = None  # (D, where it was first seen)
    for row, rollout in enumerate(rollouts):
        for name in _ROLLOUT_FIELDS:
            value = getattr(rollout, name)
            loc = ["body", "rollouts", row, name]
            if (value is not None) != (name in present):
                state = "given here but missing in" if value is not None else "missing here but given in"
                message = f"{state} rollouts.0: every rollout must give the same fields"
                errors.append(error_detail(loc, message, "fields"))
                continue
            if value is None or name not in _SEQUENCE_FIELDS:
                continue
            if steps is None:
                steps = (len(value), f"rollouts.{row}.{name}")
            elif len(value) != steps[0]:
                errors.append(error_detail(
                    loc, f"has {len(value)} steps but {steps[1]} has {steps[0]}: every sequence needs the same k",
                    "ragged"))
            if name.endswith("hidden"):
                for step, vector in enumerate(value):
                    if width is None:
                        width = (len(vector), f"rollouts.{row}.{name}.{step}")
                    elif len(vector) != width[0]:
                        errors.append(error_detail(
                            [*loc, step], f"ragged hidden states: {len(vector)} values but {width[1]} has {width[0]}",
                            "ragged"))
                        break
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    return errors


def stacked_hidden(rollouts: list[Any], name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The rollouts' `name` hidden states as one [N, k, D] tensor of `dtype`; a value beyond the dtype's
    range (finite in JSON, infinite in float32), or one the dtype cannot hold to its precision beside the
    largest value of its vector, is a 422 naming it."""
    if getattr(rollouts[0], name) is None:
        return None
    exact = torch.tensor([getattr(rollout, name) for rollout in rollouts], dtype=torch.float64)
    values = exact.to(dtype)  # rounds as converting the JSON numbers to `dtype` directly does
    dtype_name = str(dtype).removeprefix("torch.")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        row, step, index = (int(i) for i in (~finite).nonzero()[0])
        value = getattr(rollouts[row], name)[step][index]
        raise RequestValidationError([error_detail(
            ["body", "rollouts", row, name, step, index],
            f"{value!r} is outside the range of dtype {dtype_name!r}: send \"dtype\": \"float64\"", "dtype_range")])
    if dtype != torch.float64:
        # Below float32's normal range a value keeps few bits or none (1e-46 becomes 0, 2e-45 becomes 1.4e-45),
        # which changed a cosine silently; a value too small to matter beside the rest of its vector may go.
        error = (values.to(torch.float64) - exact).abs()
        lost = error > exact.abs().amax(dim=-1, keepdim=True) * (torch.finfo(dtype).eps / 2)
        if bool(lost.any()):
            row, step, index = (int(i) for i in lost.nonzero()[0])
            value = getattr(rollouts[row], name)[step][index]
            raise RequestValidationError([error_detail(
                ["body", "rollouts", row, name, step, index],
                f"{value!r} is below the precision of dtype {dtype_name!r} (it becomes "
                f"{float(values[row, step, index])!r}): send \"dtype\": \"float64\"", "dtype_precision")])
    return values


def reward_inputs(rollouts: list[Any], hidden: dict[str, torch.Tensor | None]) -> RewardInputs:
    first = rollouts[0]

    def tokens(name: str) -> torch.Tensor | None:
        if getattr(first, name) is None:
            return None
        return torch.tensor([getattr(rollout, name) for rollout in rollouts], dtype=torch.long)

    return RewardInputs(
        rollout_tokens=tokens("rollout_tokens"),
        ground_truth_tokens=tokens("ground_truth_tokens"),
        rollout_hidden=hidden["rollout_hidden"],
        ground_truth_hidden=hidden["ground_truth_hidden"],
        rollout_texts=None if first.rollout_text is None else [rollout.rollout_text for rollout in rollouts],
        reference_texts=None if first.reference_texts is None else [rollout.reference_texts for rollout in rollouts],
        count=len(rollouts),
    )
