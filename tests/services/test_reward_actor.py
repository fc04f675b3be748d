"""The reward replica as a service role (services/reward_actor.py) on a real Redis: it resolves the run's
reward as the run does (refine.reward_modules first) and decodes text only for rewards that read it."""

import sys
import threading
from collections.abc import Iterator

import pytest
import torch

from refine.algorithm.rewards import unregister_reward
from refine.config import load_config
from services.broker import Broker
from services.messages import ScoredBatch
from services.resilience import RedisStateLost
from services.reward_actor import RewardReplica
from services.streams import ROLLOUTS, SCORED, make_run_streams

PLUGIN_MODULE = "scratch_replica_rewards"
PLUGIN_REWARD = "test_replica_plugin"


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Iterator[str]:
    """A scratch module on sys.path registering PLUGIN_REWARD: the mean rollout token id."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(
        "from refine.algorithm.rewards import register_reward\n\n\n"
        f"@register_reward({PLUGIN_REWARD!r})\n"
        "def mean_token(inputs):\n"
        "    inputs.require('rollout_tokens')\n"
        "    return inputs.rollout_tokens.double().mean(dim=-1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield PLUGIN_MODULE
    unregister_reward(PLUGIN_REWARD)
    sys.modules.pop(PLUGIN_MODULE, None)


def start_replica(redis_url: str, namespace: str, *overrides: str) -> RewardReplica:
    config = load_config(None, ["demo=null", *overrides])
    return RewardReplica(config.model_dump_json(), "reward-0", redis_url, namespace)


def score_one(replica: RewardReplica, broker: Broker, batch) -> list[ScoredBatch]:
    make_run_streams(broker, colocated=False)  # as the driver does before any role starts
    broker.publish(ROLLOUTS, batch)
    try:
        assert replica.worker.run_once(block_ms=None) == 1
    finally:
        replica.runtime.close()
    return [message for _entry, message in broker.consume(SCORED, "check", "checker", ScoredBatch, count=10)]


def test_the_papers_cosine_name_scores_ids_the_tokenizer_cannot_decode(redis_url, namespace, broker, make_batch):
    """cosine_similarity reads hidden states: the replica must not decode (ids beyond the byte vocabulary
    made it dead-letter every batch)."""
    replica = start_replica(redis_url, namespace, "refine.reward=cosine_similarity")
    assert replica.worker.decode is None
    source = make_batch(seed=1)
    source = source.model_copy(update={"rollout_tokens": source.rollout_tokens + 10**6})
    [scored] = score_one(replica, broker, source)
    assert torch.equal(scored.rewards, torch.nn.functional.cosine_similarity(
        source.rollout_hidden, source.ground_truth_hidden, dim=-1).mean(dim=-1))
    assert broker.dead_letters(ROLLOUTS) == []


def test_a_text_reward_gets_the_runs_tokenizer(redis_url, namespace):
    replica = start_replica(redis_url, namespace, "refine.reward=qa_f1")
    replica.runtime.close()
    assert replica.worker.decode is not None and replica.worker.decode([104, 105]) == "hi"


def test_a_custom_reward_from_the_runs_reward_modules_is_served(redis_url, namespace, broker, make_batch, plugin):
    replica = start_replica(redis_url, namespace, f"refine.reward={PLUGIN_REWARD}",
                            f"refine.reward_modules=[{plugin}]")
    source = make_batch(seed=2)
    [scored] = score_one(replica, broker, source)
    assert scored.reward_type == PLUGIN_REWARD
    assert torch.equal(scored.rewards, source.rollout_tokens.double().mean(dim=-1))


def test_a_module_that_does_not_import_names_the_setting(redis_url, namespace):
    with pytest.raises(ValueError, match="refine.reward_modules: cannot import 'no_such_rewards_module'"):
        start_replica(redis_url, namespace, "refine.reward_modules=[no_such_rewards_module]")


def test_a_replica_that_starts_after_its_run_ended_makes_no_stream(redis_url, namespace, redis_client):
    """Ray kills actors asynchronously: a replica still starting when a second Ctrl-C killed its run made its consumer
    group, and the rollouts stream with it, after the run had deleted its namespace; the key stayed in Redis. It
    makes no stream: its loop ends on the run's lost state."""
    replica = start_replica(redis_url, namespace)
    stop = threading.Timer(30, Broker(redis_client, namespace).request_stop, ["test"])  # ends a loop that reads on
    stop.start()
    try:
        with pytest.raises(RedisStateLost, match=rf"^stream '{namespace}:stream:{ROLLOUTS}' \(read by consumer group "
                                                 rf"'reward'\) no longer exists$"):
            replica.run()
    finally:
        stop.cancel()
        replica.runtime.close()
    assert list(redis_client.scan_iter(match=f"{namespace}:stream:*")) == []


def test_a_replica_whose_scored_stream_is_gone_does_not_make_it_again(redis_url, namespace, broker, make_batch):
    """The run's namespace deleted while the replica scored a batch: publishing the scored batch made the stream
    again."""
    replica = start_replica(redis_url, namespace)
    make_run_streams(broker, colocated=False)
    broker.publish(ROLLOUTS, make_batch(seed=3))
    broker.client.delete(broker.key("stream", SCORED))
    try:
        with pytest.raises(RedisStateLost, match=rf"^stream '{namespace}:stream:{SCORED}' no longer exists$"):
            replica.worker.run_once(block_ms=None)
    finally:
        replica.runtime.close()
    assert not broker.client.exists(broker.key("stream", SCORED))
