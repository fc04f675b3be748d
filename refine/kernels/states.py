"""Delta rule with states at positions chosen after the forward (see refine/models/base.py)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from refine.kernels.dispatch import delta_rule


def delta_rule_with_states(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
    scale: float | None = None, initial_state: Tensor | None = None, want_states: bool = False,
) -> tuple[Tensor, Callable[[Tensor], Tensor] | None]:
    o, _ = delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state)
    if not want_states:
        return o, None

    def states_at(positions: Tensor) -> Tensor:
        return delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state, positions=positions)[1]

    return o, states_at
