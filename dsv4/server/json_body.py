"""Strict JSON request bodies: what Python's json module lets through but a server must not.

Python parses NaN / Infinity, 1e400 (as inf) and unpaired UTF-16 surrogate escapes ("\\ud800");
pydantic-core then fails on such strings with a UnicodeEncodeError (a 500). Routes built with
`StrictJSONRoute` parse the body here first, so these become 400 "not valid JSON" errors that
say where.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from dsv4.server.errors import APIError

MAX_DEPTH = 128  # nesting of arrays and objects; deeper bodies would exhaust the stack later,
# when a tool call's arguments are rendered into the prompt


def lone_surrogate_path(value: Any, path: str = "", depth: int = 0) -> str | None:
    """Where the first string (key or value) holding an unpaired surrogate is, else None.
    The same walk refuses nesting deeper than MAX_DEPTH (RecursionError)."""
    if depth > MAX_DEPTH:
        raise RecursionError
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the body"
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            found = lone_surrogate_path(key, f"a key in {path or 'the body'}") or \
                lone_surrogate_path(item, sub, depth + 1)
            if found is not None:
                return found.encode("utf-8", "backslashreplace").decode("utf-8")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}[{i}]", depth + 1)
            if found is not None:
                return found
    return None


def parse_json(body: bytes) -> Any:
    def no_constant(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise json.JSONDecodeError(f"{text} is too large for a float64", text, 0)
        return value

    try:
        value = json.loads(body, parse_constant=no_constant, parse_float=finite)
        where = lone_surrogate_path(value)
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 ({exc.reason})", "", 0) from None
    except RecursionError:
        raise json.JSONDecodeError(f"arrays or objects are nested more than {MAX_DEPTH} deep",
                                   "", 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise json.JSONDecodeError(str(exc), "", 0) from None
    if where is not None:
        raise json.JSONDecodeError(
            f"{where} holds an unpaired UTF-16 surrogate escape, which is not valid Unicode",
            "", 0)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind and kind != "application/json" and not kind.endswith("+json"):
                raise APIError(f"the body must be JSON sent as Content-Type: application/json, "
                               f"not {kind!r}", status=415, code="unsupported_media_type")
            strict_request = StrictJSONRequest(request.scope, request.receive)
            await strict_request.body()  # read here, so that a body over the size limit gets
            # its 413 rather than FastAPI's "error parsing the body"
            return await handler(strict_request)

        return strict
