"""Riding out Redis outages: `retry_redis` retries transient errors until its deadline and lets
everything else through; `OutageTolerance` tracks how long role loop iterations keep failing."""

import pickle
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.resilience import TRANSIENT, OutageTolerance, RedisOutage, outage_timeout_s, retry_redis


def failing(times: int, error: BaseException, result: str = "done"):
    """A callable that raises `error` on its first `times` calls, then returns `result`; `.calls` counts."""
    def call() -> str:
        call.calls += 1
        if call.calls <= times:
            raise error
        return result
    call.calls = 0
    return call


@pytest.mark.parametrize("error", [
    redis.ConnectionError("connection refused"),
    redis.TimeoutError("timed out"),
    redis.BusyLoadingError("loading the dataset in memory"),
    ConnectionResetError("reset by peer"),
], ids=lambda error: type(error).__name__)
def test_retry_returns_once_the_transient_error_stops(error: BaseException) -> None:
    """Every transient kind is retried, and the first successful call's result is returned."""
    assert isinstance(error, TRANSIENT)
    call = failing(2, error)
    assert retry_redis(call, "publish rollouts", timeout_s=30.0) == "done"
    assert call.calls == 3


def test_retry_does_not_repeat_a_call_that_succeeds() -> None:
    """A call that works at once runs once."""
    call = failing(0, redis.ConnectionError("never raised"), result="first")
    assert retry_redis(call, "ack documents", timeout_s=30.0) == "first"
    assert call.calls == 1


def test_retry_gives_up_after_its_timeout_naming_what() -> None:
    """A transient error that never stops ends in RedisOutage naming the operation and the last error,
    after several tries."""
    cause = redis.ConnectionError("connection refused")
    call = failing(10**9, cause)
    started = time.monotonic()
    with pytest.raises(RedisOutage, match=r"^publish weights v3: Redis unreachable for \d+s \(0s tolerated; "
                                          r"ConnectionError: connection refused\)$") as caught:
        retry_redis(call, "publish weights v3", timeout_s=0.4)
    assert time.monotonic() - started < 20  # gave up instead of retrying for its default two minutes
    assert caught.value.elapsed_s >= 0.4  # and not before its timeout: the last try comes at the deadline
    assert caught.value.__cause__ is cause
    assert call.calls >= 2  # retried before giving up


def test_retry_reports_how_long_a_hanging_call_kept_it_waiting() -> None:
    """A call that hangs until its socket timeout overruns the tolerance: the outage names the time it
    really took (a Redis that stopped answering), not the tolerance."""
    def hang() -> None:
        time.sleep(2.2)
        raise redis.TimeoutError("Timeout reading from 127.0.0.1:6380")

    with pytest.raises(RedisOutage, match=r"^read weight version: Redis unreachable for \d+s \(1s tolerated; "
                                          r"TimeoutError: ") as caught:
        retry_redis(hang, "read weight version", timeout_s=1.0)
    assert caught.value.elapsed_s >= 2.2
    assert str(caught.value).startswith(f"read weight version: Redis unreachable for {caught.value.elapsed_s:.0f}s ")


def test_an_outage_keeps_its_elapsed_time_across_a_process_boundary() -> None:
    """Ray pickles a role's exception to send it to the driver: the message and the time survive."""
    outage = pickle.loads(pickle.dumps(RedisOutage("learner: Redis unreachable for 75s", 75.2)))
    assert str(outage) == "learner: Redis unreachable for 75s"
    assert outage.elapsed_s == 75.2


def test_retry_gives_up_on_an_unreachable_redis(closed_port: int) -> None:
    """A real client of a port nothing listens on: its ConnectionError is retried, then RedisOutage."""
    # The client's own retries are off (redis-py retries a refused connection with backoff, about 3 s a
    # call): retry_redis does the retrying here.
    client = redis.Redis(port=closed_port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    calls = []

    def ping() -> bool:
        calls.append(time.monotonic())
        return client.ping()

    expected = r"^worker-0: register: Redis unreachable for \d+s \(1s tolerated; ConnectionError: "
    try:
        with pytest.raises(RedisOutage, match=expected) as caught:
            retry_redis(ping, "worker-0: register", timeout_s=0.8)
    finally:
        client.close()
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    assert len(calls) >= 2


def test_retry_backoff_is_capped_by_max_backoff() -> None:
    """Waits double from 0.05 s (at most 6 tries in 1 s, the last at the deadline) unless max_backoff_s caps
    them: with a 0.01 s cap the retries keep coming at that pace."""
    uncapped = failing(10**9, redis.ConnectionError("down"))
    with pytest.raises(RedisOutage):
        retry_redis(uncapped, "heartbeat", timeout_s=1.0)
    assert 2 <= uncapped.calls <= 6

    capped = failing(10**9, redis.ConnectionError("down"))
    with pytest.raises(RedisOutage):
        retry_redis(capped, "heartbeat", timeout_s=1.0, max_backoff_s=0.01)
    assert capped.calls >= 8


@pytest.mark.parametrize("error", [
    ValueError("bad message"),
    redis.ResponseError("NOGROUP No such key or consumer group"),
    KeyError("missing"),
], ids=lambda error: type(error).__name__)
def test_retry_lets_other_errors_through_at_once(error: BaseException) -> None:
    """A non-transient error (a Redis command error included) is raised as it is after one call."""
    call = failing(10**9, error)
    with pytest.raises(type(error)) as caught:
        retry_redis(call, "publish rollouts", timeout_s=30.0)
    assert caught.value is error
    assert call.calls == 1


def test_outage_record_says_true_only_for_the_first_failure() -> None:
    """The first failure of an outage is reported as new (say it once), the following ones are not."""
    outage = OutageTolerance("worker-0", timeout_s=60.0)
    error = redis.ConnectionError("down")
    assert outage.since is None
    assert outage.record(error) is True
    started = outage.since
    assert started is not None
    assert outage.record(error) is False
    assert outage.record(error) is False
    assert outage.since == started  # the outage is timed from its first failure


def test_outage_record_raises_past_its_timeout() -> None:
    """Failures that keep coming for longer than timeout_s end in RedisOutage naming who gave up."""
    outage = OutageTolerance("orchestrator", timeout_s=0.2)
    error = redis.ConnectionError("down")
    assert outage.record(error) is True
    time.sleep(0.4)
    with pytest.raises(RedisOutage, match=r"^orchestrator: Redis unreachable for \d+s \(0s tolerated\)$") as caught:
        outage.record(error)
    assert caught.value.__cause__ is error


def test_outage_succeeded_starts_a_new_outage() -> None:
    """A successful iteration ends the outage: the next failure is new again and the timeout counts
    from it, not from the earlier outage."""
    outage = OutageTolerance("worker-0", timeout_s=0.3)
    error = redis.TimeoutError("slow")
    assert outage.record(error) is True
    assert outage.record(error) is False
    time.sleep(0.5)  # past the timeout for this outage ...
    outage.succeeded()
    assert outage.since is None
    assert outage.record(error) is True  # ... but a new outage has just begun: no RedisOutage
    assert outage.record(error) is False


def test_outage_failed_pauses_then_gives_up() -> None:
    """`failed` records the failure and pauses pause_s before the retry; past the timeout it raises."""
    outage = OutageTolerance("learner", timeout_s=0.3, pause_s=0.05)
    error = redis.ConnectionError("down")
    started = time.monotonic()
    outage.failed(error)
    assert time.monotonic() - started >= 0.05
    assert outage.since is not None
    time.sleep(0.4)
    with pytest.raises(RedisOutage, match=r"^learner: "):
        outage.failed(error)


@pytest.mark.parametrize(("heartbeat_timeout_s", "expected"), [(3, 60.0), (15, 60.0), (16, 64.0), (30, 120.0)])
def test_outage_timeout_is_four_heartbeat_timeouts_and_at_least_a_minute(heartbeat_timeout_s, expected) -> None:
    """Four heartbeat timeouts, never under the minute a Redis restart may take."""
    assert outage_timeout_s(heartbeat_timeout_s) == expected
