"""Validated rollouts as reward inputs, served for real: hidden values the request's dtype cannot hold are
refused, naming them."""

from typing import Any

import pytest
import torch

from refine.algorithm.rewards import cosine_reward


def test_hidden_values_float32_cannot_hold_are_refused_and_float64_scores_them(client):
    """1e-46 is 0 in float32: its cosine came out 0 silently. Subnormal float32 keeps too few bits to score
    [1e-45, 2e-45] against [2e-45, 1e-45] (both become [1.4e-45, 1.4e-45]: cosine 1, not 0.8)."""
    tiny = {"rollout_hidden": [[1e-46, 1e-46]], "ground_truth_hidden": [[1e-46, 1e-46]]}
    coarse = {"rollout_hidden": [[1e-45, 2e-45]], "ground_truth_hidden": [[2e-45, 1e-45]]}
    for item, error in [(tiny, "rollouts.0.rollout_hidden.0.0: 1e-46 is below the precision of dtype 'float32' "
                               "(it becomes 0.0): send \"dtype\": \"float64\""),
                        (coarse, "rollouts.0.rollout_hidden.0.0: 1e-45 is below the precision of dtype 'float32' "
                                 "(it becomes 1.401298464324817e-45): send \"dtype\": \"float64\"")]:
        response = client.post("/v1/score", json={"reward_type": "cosine", "rollouts": [item]})
        assert response.status_code == 422, response.text
        assert response.json()["error"] == error

    def in_process(item: dict[str, Any], dtype: torch.dtype) -> list[float]:
        return cosine_reward(torch.tensor([item["rollout_hidden"]], dtype=dtype),
                             torch.tensor([item["ground_truth_hidden"]], dtype=dtype)).tolist()

    for item, expected in [(tiny, 1.0), (coarse, 0.8)]:
        response = client.post("/v1/score", json={"reward_type": "cosine", "dtype": "float64", "rollouts": [item]})
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == in_process(item, torch.float64) == pytest.approx([expected])
    # What float32 holds is scored as the replicas score it, subnormals included; a value too small to matter
    # beside the largest of its vector may round away.
    sub = float(torch.tensor(1e-40, dtype=torch.float32))
    held = {"rollout_hidden": [[sub, 3 * sub]], "ground_truth_hidden": [[3 * sub, sub]]}
    negligible = {"rollout_hidden": [[1.0, 1e-46]], "ground_truth_hidden": [[1.0, -1e-46]]}
    for item, expected in [(held, 0.6), (negligible, 1.0)]:
        response = client.post("/v1/score", json={"reward_type": "cosine", "rollouts": [item]})
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == in_process(item, torch.float32) == pytest.approx([expected])
