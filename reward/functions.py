"""Task rewards scored from text, added to the reward registry of `refine.algorithm.rewards`.

    qa_f1            LongBench's qa_f1_score (bag-of-words F1 after answer normalization),
                     the best score over the gold answers;
    substring_match  RULER QA: 1 when any gold answer occurs (case-insensitively) in the cleaned
                     first line of the rollout, else 0.

Both read `RewardInputs.rollout_texts` and `reference_texts` (registered with reads_text=True). A blank
gold answer (empty or whitespace only) matches nothing: it is left out, and a rollout whose gold answers are
all blank scores 0. In the service the gold answer is the document's own continuation, decoded, which can be
blank lines or indentation; a substring match would score every rollout as right against it. Importing this
module registers them; importing (or reloading) it again is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from refine.algorithm.rewards import RewardFn, RewardInputs, get_reward, register_reward, unregister_reward

__all__ = ["TASK_REWARDS", "qa_f1", "substring_match"]

TextScore = Callable[[str, Sequence[str]], float]


def _score_texts(inputs: RewardInputs, reward_name: str, score: TextScore) -> Tensor:
    inputs.require("rollout_texts", "reference_texts")
    assert inputs.rollout_texts is not None and inputs.reference_texts is not None
    values = []
    for row, (prediction, references) in enumerate(zip(inputs.rollout_texts, inputs.reference_texts)):
        if not references:
            raise ValueError(f"reward {reward_name!r}: reference_texts[{row}] is empty; give at least one gold answer")
        # The HTTP API refuses blank ones; here they come from ground-truth tokens that decode to whitespace.
        answers = [answer for answer in references if answer.strip()]
        values.append(score(prediction, answers) if answers else 0.0)
    return torch.tensor(values, dtype=torch.float32)


def _best_qa_f1(prediction: str, references: Sequence[str]) -> float:
    """qa_f1_score's maximum over the gold answers, the prediction normalized and counted once (not once per
    answer: a long rollout text with 64 gold answers took seconds)."""
    # Imported here so that registering the rewards never depends on the evaluation package.
    from refine.evaluation.metrics import best_f1_score, normalize_answer

    answers = [normalize_answer(answer).split() for answer in references]
    return best_f1_score(normalize_answer(prediction).split(), answers)


def _ruler_substring(prediction: str, references: Sequence[str]) -> float:
    from refine.evaluation.metrics import ruler_qa_score

    return ruler_qa_score(prediction, references)


def qa_f1(inputs: RewardInputs) -> Tensor:
    """LongBench QA F1 of each rollout text, max over its gold answers: [N] in [0, 1]."""
    return _score_texts(inputs, "qa_f1", _best_qa_f1)


def substring_match(inputs: RewardInputs) -> Tensor:
    """RULER QA string match on each rollout's first line: [N] of 0 / 1."""
    return _score_texts(inputs, "substring_match", _ruler_substring)


TASK_REWARDS: dict[str, RewardFn] = {"qa_f1": qa_f1, "substring_match": substring_match}


def _register(name: str, fn: RewardFn) -> None:
    try:
        existing = get_reward(name)
    except ValueError:
        existing = None
    # A reload of this module brings new function objects: replace our own, never someone else's.
    if existing is not None and existing.__module__ == fn.__module__ and existing.__qualname__ == fn.__qualname__:
        unregister_reward(name)
    register_reward(name, reads_text=True)(fn)


for _name, _fn in TASK_REWARDS.items():
    _register(_name, _fn)
