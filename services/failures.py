"""How a service run's failures are told: the error that ends a run, and an actor's failure on one line."""

from __future__ import annotations

import ray

from services.resilience import RedisOutage

__all__ = ["ServiceError", "actor_error", "describe_failure"]


class ServiceError(RuntimeError):
    """A role of the run failed in a way the orchestrator cannot repair."""


def actor_error(exc: BaseException) -> BaseException:
    """What an actor raised, without Ray's wrapping: RayTaskError.cause, or for an actor whose __init__
    raised, the creation task's RayTaskError that ActorDiedError carries (ray 2.x keeps it in args only)."""
    for _ in range(8):  # wrappings nest a few levels at most
        if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
            exc = exc.cause
        elif (isinstance(exc, ray.exceptions.ActorDiedError) and exc.args
              and isinstance(exc.args[0], ray.exceptions.RayTaskError)):
            exc = exc.args[0]
        else:
            break
    return exc


def describe_failure(exc: BaseException) -> str:
    """An actor's failure on one line: the message of what it raised, without Ray's remote traceback."""
    cause = actor_error(exc)
    if isinstance(cause, ray.exceptions.RayError):  # no Python error: killed, out of memory, node lost
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        detail = f"{lines[0]} ({lines[-1]})" if len(lines) > 1 else "".join(lines)
        return f"{type(cause).__name__}: {detail}"
    message = " ".join(str(cause).split())
    if message and isinstance(cause, (ValueError, OSError, ServiceError, RedisOutage)):
        return message  # these name the field, path or address themselves
    return f"{type(cause).__name__}: {message}" if message else type(cause).__name__
