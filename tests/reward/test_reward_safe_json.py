"""The safe JSON parsing of request bodies, served for real: a key given twice is refused, naming it."""

import json

from http_helpers import JSON, check_correct_requests, rollouts


def test_a_key_given_twice_is_refused_naming_it(client):
    """The last of two equal keys won silently."""
    cases = [
        ('{"reward_type": "binary", "reward_type": "cosine", "rollouts": @}', rollouts(),
         "reward_type: duplicate key 'reward_type': given 2 times in one JSON object, each key may appear once"),
        ('{"reward_type": "cosine", "rollouts": @}', [rollouts()[0], {**rollouts()[1], "@": 0}],
         "rollouts.1.rollout_hidden: duplicate key 'rollout_hidden': given 2 times in one JSON object, each key "
         "may appear once"),
    ]
    for template, items, error in cases:
        raw = template.replace("@", json.dumps(items))
        raw = raw.replace('"@": 0', '"rollout_hidden": [[1.0, 1.0], [1.0, 1.0]]')
        response = client.post("/v1/score", content=raw.encode(), headers=JSON)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == error
    nested = '{"reward_type": "cosine", "rollouts": [{"extra": [{"a": 1, "a": 2, "a": 3}]}]}'
    response = client.post("/v1/score", content=nested.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "rollouts.0.extra.0.a"
    assert "given 3 times" in response.json()["error"]
    check_correct_requests(client)
