"""JSON request bodies parsed safely: what json.loads rejects, a repeated key or too many keys is a 422 naming it."""

import functools
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from reward.http_errors import MAX_REPORTED_ERRORS, JSONRefused, error_detail

# No object of the request has more than 6 keys; pydantic reports every unknown key as an error of its own, so
# one object of millions of keys took gigabytes to refuse.
_MAX_OBJECT_KEYS = 64


class _FlaggedObject(dict[str, Any]):
    """A parsed JSON object that repeats a key or holds too many: (loc below it, message, type) per problem."""

    problems: list[tuple[list[str], str, str]]


def _json_object(flagged: list[_FlaggedObject], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: the object as a dict, flagged when it repeats a key (a plain dict keeps the
    last one silently) or holds more keys than any object of the request may."""
    value = dict(pairs)
    if len(value) == len(pairs) and len(pairs) <= _MAX_OBJECT_KEYS:
        return value
    marked = _FlaggedObject(value)
    if len(pairs) > _MAX_OBJECT_KEYS:
        marked.problems = [([], f"a JSON object of {len(pairs)} keys, more than the {_MAX_OBJECT_KEYS} any object "
                                f"of this API may hold", "json_too_many_keys")]
    else:
        marked.problems = [([key], f"duplicate key {key!r}: given {count} times in one JSON object, each key may "
                                   f"appear once", "json_duplicate_key")
                           for key, count in Counter(key for key, _ in pairs).items() if count > 1]
    flagged.append(marked)
    return marked


def _flagged_details(document: Any) -> list[dict[str, Any]]:
    """The problems of the flagged objects in `document`, in document order, each at its location (one is
    always found: an object dropped for a repeated key leaves the object that repeated it flagged)."""
    details: list[dict[str, Any]] = []
    # Iterative (the document may nest as deep as the parser allowed) and with linked paths (key, parent),
    # that are spelled out for a problem only.
    stack: list[tuple[Any, tuple[Any, Any] | None]] = [(document, None)]
    while stack and len(details) < MAX_REPORTED_ERRORS:
        value, path = stack.pop()
        if isinstance(value, _FlaggedObject):
            loc: list[Any] = []
            node = path
            while node is not None:
                loc.insert(0, node[0])
                node = node[1]
            details.extend(error_detail(["body", *loc, *below], msg, kind) for below, msg, kind in value.problems)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        children = [(child, (key, path)) for key, child in items if isinstance(child, (dict, list))]
        stack.extend(reversed(children))
    return details[:MAX_REPORTED_ERRORS]


class _SafeJSONRequest(Request):
    """Request whose JSON parsing fails as a JSON error (422) on anything json.loads rejects,
    including nesting deep enough to exhaust the stack and integers with too many digits, and
    on an object that repeats a key or holds too many."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            flagged: list[_FlaggedObject] = []
            try:
                document = json.loads(body, object_pairs_hook=functools.partial(_json_object, flagged))
            except json.JSONDecodeError:
                raise
            except RecursionError:
                raise json.JSONDecodeError("JSON nested too deeply", "", 0) from None
            except ValueError as exc:  # invalid UTF-8, integers over Python's digit limit
                raise json.JSONDecodeError(str(exc)[:200], "", 0) from None
            if flagged:
                raise JSONRefused(_flagged_details(document))
            self._json = document
        return self._json


class SafeJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def safe_handler(request: Request) -> Response:
            return await handler(_SafeJSONRequest(request.scope, request.receive))

        return safe_handler
