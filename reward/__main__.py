"""`python -m reward --port 8000`: serve the reward service's HTTP API (loopback unless --host).

`--reward-module MODULE` (repeatable) imports a module that registers custom rewards with
`refine.algorithm.rewards.register_reward` before the API starts, as `refine.reward_modules` does for a run.
"""

from __future__ import annotations

import argparse
import errno
import socket

from pydantic import ValidationError

from refine.algorithm.rewards import import_reward_modules
from reward.http import ScoreLimits, serve


def address_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, naming the flag, or None when it can.

    uvicorn binds only after the app is built and said "[Errno -2] Name or service not known" for a
    host that is not an address, naming neither the flag nor the value. Bound as asyncio does (every
    address the host resolves to, SO_REUSEADDR) and closed again at once.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:  # socket.gaierror; an IDNA label over 63 characters, a NUL character
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"--host must be an IP address or a host name that resolves, got {host!r} ({reason})"
    for family, kind, proto, _, address in addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # an address family this machine has no sockets for (IPv6 off): asyncio skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"--host {host!r} is not an address of this machine ({exc.strerror})"
                return f"--port: cannot listen on port {port} of {host!r} ({exc.strerror})"
    return None


def main(argv: list[str] | None = None) -> None:
    defaults = ScoreLimits()
    parser = argparse.ArgumentParser(prog="python -m reward", description="REFINE reward service HTTP API")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--reward-module", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: it registers custom rewards with register_reward (repeatable)")
    for name, field in ScoreLimits.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"{field.description} (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if not args.host.strip():  # uvicorn binds every interface for an empty host: only an explicit 0.0.0.0 does
        parser.error(f"--host must name an address (0.0.0.0 for every interface), got {args.host!r}")
    try:
        limits = ScoreLimits(**{name: getattr(args, name) for name in ScoreLimits.model_fields})
    except ValidationError as exc:
        # One line naming the flag, not pydantic's multi-line report naming the field.
        parser.error("; ".join(
            f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg'].removeprefix('Value error, ')}, "
            f"got {error['input']!r}"
            for error in exc.errors()
        ))
    try:
        import_reward_modules(args.reward_module, setting="--reward-module")
    except ValueError as exc:
        parser.error(str(exc))
    problem = address_problem(args.host, args.port)
    if problem:
        parser.error(problem)
    serve(host=args.host, port=args.port, log_level=args.log_level, limits=limits)


if __name__ == "__main__":
    main()
