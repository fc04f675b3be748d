"""Reward service: task reward functions, batch scoring, Redis-stream replicas and the HTTP API.

Importing the package registers the task rewards (qa_f1, substring_match) next to the
self-supervised ones of `refine.algorithm.rewards`.
"""

import reward.functions  # noqa: F401  (registers the task rewards)
from reward.scoring import ScoringError, score_batch

__all__ = ["ScoringError", "score_batch"]
