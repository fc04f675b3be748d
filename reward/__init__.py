"""Reward service: task reward functions, batch scoring, Redis-stream replicas and the HTTP API.

Importing the package registers the task rewards (qa_f1, substring_match) next to the
self-supervised ones of `refine.algorithm.rewards`. The scoring names are loaded on first use, so
that the core library can import `reward.functions` without the service's message layer.
"""

from typing import Any

import reward.functions  # noqa: F401  (registers the task rewards)

__all__ = ["ScoringError", "score_batch"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import reward.scoring

        return getattr(reward.scoring, name)
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
