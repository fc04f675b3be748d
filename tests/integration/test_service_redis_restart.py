"""Fault: Redis (append-only persistence) restarted in the middle of a run, or gone for good."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

import services.orchestrator as orchestrator_module
import services.resilience as resilience_module
from refine.config import RunConfig, run_tokenizer
from service_helpers import assert_every_batch_trained_once, events, step_rows, tiny_config
from services.broker import Broker
from services.failures import ServiceError
from services.orchestrator import REDIS_RETRY_PAUSE_S, Orchestrator, Stats, run
from services.progress import read_progress
from services.redis_server import EmbeddedRedis, connect, redact_url

pytestmark = pytest.mark.slow


@contextmanager
def _reserved_port() -> Iterator[int]:
    """A port on 127.0.0.1 kept ours while the block runs, with or without a Redis server on it.

    A socket bound to it (SO_REUSEADDR, never listening) holds it: redis-server, which binds with
    SO_REUSEADDR, can listen on it (again and again: a restart rebinds the same port), while no other
    process can bind it and the kernel never hands it out as the local port of an outgoing connection
    (a client reconnecting to the stopped server could otherwise connect to itself on that very port).
    Picking a free port and releasing it before the server binds it, or between a stop and a restart,
    leaves it to whoever asks first."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def reserved_port() -> Iterator[int]:
    """A port reserved for the whole test (`_reserved_port`)."""
    with _reserved_port() as port:
        yield port


def _run_through_a_restart(config: RunConfig, data_dir: Path, port: int, when: Callable[[Broker], bool],
                           down_s: float, stopped: threading.Event | None = None) -> Stats:
    """Run `config` on a Redis with append-only persistence that a helper thread stops once `when(broker)` holds
    (then sets `stopped`) and starts again on the same data and port `down_s` seconds later; returns the run's
    stats."""

    def server() -> EmbeddedRedis:
        # Not tied to the thread that starts it: the restart happens on a helper thread.
        return EmbeddedRedis(data_dir=data_dir, port=port, appendonly=True, appendfsync="always",
                             die_with_parent=False)

    servers = [server().start()]
    broker = Broker(connect(servers[0].url), config.service.namespace)
    restarted = threading.Event()

    def restart() -> None:
        while True:
            try:
                if when(broker):
                    break
            except Exception:  # the run's keys are not there yet
                pass
            time.sleep(0.005)
        servers[0].stop()
        if stopped is not None:
            stopped.set()
        time.sleep(down_s)  # every role sees connection errors for a while
        servers.append(server().start())
        restarted.set()

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    try:
        stats = run(config, progress=False, redis_url=servers[0].url)
        restarter.join(timeout=30)
    finally:
        for redis_server in servers:
            redis_server.stop()
    assert restarted.is_set()
    return stats


def test_redis_restart_with_append_only_file_loses_nothing(ray_session, tmp_path: Path, reserved_port: int) -> None:
    steps, batch = 8, 2
    # A corpus smaller than the run: the data stream wraps around mid-run too.
    config = tiny_config(tmp_path, f"train.steps={steps}", f"train.batch_size={batch}", "data.num_documents=12")
    at_step: list[int] = []

    def mid_run(broker: Broker) -> bool:
        progress = read_progress(broker)
        if progress is not None and progress.step >= 2:
            at_step.append(progress.step)
        return bool(at_step)

    # The restarted server must get the same port back.
    stats = _run_through_a_restart(config, tmp_path / "redis", reserved_port, mid_run, down_s=1.0)
    assert at_step[0] < steps
    rows = step_rows(tmp_path / "run")
    assert_every_batch_trained_once(rows, config)
    assert events(tmp_path / "run") == []  # nothing dropped, no role restarted
    assert stats["step"] == steps


def test_redis_restart_while_the_learner_starts_is_ridden_out(ray_session, tmp_path: Path, reserved_port: int) -> None:
    """The driver renews its namespace claim while it waits for the learner to start: an outage then is ridden
    out as one during training is (it crashed the run with a raw ConnectionError)."""
    steps = 4
    config = tiny_config(tmp_path, f"train.steps={steps}")
    learner_started: list[bool] = []

    def as_the_run_starts(broker: Broker) -> bool:  # the driver claimed the namespace
        if broker.claimed_by() is None:
            return False
        learner_started.append(read_progress(broker) is not None)
        return True

    # Several start polls see connection errors.
    stats = _run_through_a_restart(config, tmp_path / "redis", reserved_port, as_the_run_starts, down_s=3.0)
    assert learner_started == [False]
    assert stats["step"] == steps
    assert [row["step"] for row in step_rows(tmp_path / "run")] == list(range(1, steps + 1))


def test_redis_restart_as_the_driver_sets_up_its_streams_is_ridden_out(ray_session, tmp_path: Path, reserved_port: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after its claim the driver empties the namespace and makes the consumer groups: a restart then
    crashed the run with a raw ConnectionError (the test above hit it now and then)."""
    steps = 2
    config = tiny_config(tmp_path, f"train.steps={steps}")
    stopped = threading.Event()
    set_up = Orchestrator._fresh_streams

    def once_redis_is_down(self: Orchestrator) -> None:
        assert stopped.wait(60)
        set_up(self)

    monkeypatch.setattr(Orchestrator, "_fresh_streams", once_redis_is_down)
    stats = _run_through_a_restart(config, tmp_path / "redis", reserved_port,
                                   lambda broker: broker.claimed_by() is not None, down_s=2.0, stopped=stopped)
    assert stats["step"] == steps


def _ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


class OutageClock:
    """The outage tolerance's clock (services.resilience's `time`): it moves only when a pause of the
    driver runs to its end, by that pause, so when the driver gives up is a matter of counting pauses."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        self.now += seconds


class RetryPauses:
    """The driver module's `time`, watching its sleeps (its one sleep is the pause between Redis retries):
    the first pause gets a real Ctrl-C (SIGALRM to the main thread, raising KeyboardInterrupt as SIGINT
    does), so the interrupt arrives exactly while the driver waits for Redis, however slow the machine.
    The pauses that run to their end are counted and move the outage clock; all else is the real `time`."""

    def __init__(self, orchestrator: Orchestrator, clock: OutageClock) -> None:
        self.orchestrator, self.clock = orchestrator, clock
        self.interrupted_in_outage: bool | None = None
        self.completed: list[float] = []

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if self.interrupted_in_outage is None:
            self.interrupted_in_outage = self.orchestrator.outage.since is not None
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
        self.clock.sleep(seconds)
        self.completed.append(seconds)


def test_driver_gives_up_on_redis_gone_for_good(ray_session, tmp_path: Path, reserved_port: int,
                                                 monkeypatch) -> None:
    """Past the outage tolerance the driver ends the run naming the Redis URL; a Ctrl-C during the
    retries is the graceful stop, not a traceback; a learner that returned ends the loop while Redis is down."""
    config = tiny_config(tmp_path)
    port = reserved_port  # Redis is gone for good: no other server may appear at its URL meanwhile
    servers = [EmbeddedRedis(port=port).start()]
    url = servers[0].url
    orchestrator = Orchestrator(config, run_tokenizer(config), url, config.service.namespace, resume=False,
                                progress=False)
    servers[0].stop()
    # A learner still training (a lambda: Ray's workers cannot import this test module).
    learner = ray.remote(num_cpus=0)(lambda: time.sleep(600)).remote()
    orchestrator.learner_future = learner
    orchestrator.outage.timeout_s = 2.0  # the rule's minute, shortened
    # The learner here never checkpoints: giving up waits the whole grace for it, shortened too.
    monkeypatch.setattr(orchestrator_module, "STOP_GRACE_S", 1.0)
    # Should the driver retry forever, the learner "returns" after a minute: the loop ends without the error
    # and the test fails instead of hanging (a guard against hanging only, not a speed limit).
    rescue = threading.Timer(60, lambda: ray.cancel(learner, force=True))
    rescue.start()
    clock = OutageClock()
    pauses = RetryPauses(orchestrator, clock)
    monkeypatch.setattr(orchestrator_module, "time", pauses)
    monkeypatch.setattr(resilience_module, "time", clock)
    previous = signal.signal(signal.SIGALRM, _ctrl_c)
    try:
        with pytest.raises(ServiceError, match=rf"Redis at {re.escape(redact_url(url))} unreachable for 2s"):
            orchestrator._loop()
        assert pauses.interrupted_in_outage  # the Ctrl-C came during a retry pause of the outage ...
        assert orchestrator.stopping  # ... and was taken as the graceful stop
        # It gave up on the first retry more than the 2 s tolerance into the outage, not sooner or later: the
        # outage clock moves by the completed pauses alone (the interrupted one is not one of them).
        needed, waited = 0, 0.0
        while waited <= 2.0:
            needed, waited = needed + 1, waited + REDIS_RETRY_PAUSE_S
        assert pauses.completed == [REDIS_RETRY_PAUSE_S] * needed  # 5 pauses of 0.5 s: 2.5 s
        # The learner returned (it gave up on Redis too): the loop ends at once, Redis still down.
        orchestrator.learner_future = ray.put("{}")
        orchestrator.outage.succeeded()
        orchestrator._loop()
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the Redis retries escaped the driver's loop")
    finally:
        signal.signal(signal.SIGALRM, previous)
        rescue.cancel()
        ray.cancel(learner, force=True)
        orchestrator.client.close()
        for server in servers:
            server.stop()
