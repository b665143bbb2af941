"""Strict JSON request bodies: what Python's json module lets through but a server must not.

Python parses NaN / Infinity and unpaired UTF-16 surrogate escapes ("\\ud800"); pydantic-core
then fails on such strings with a UnicodeEncodeError (a 500). Routes built with
`StrictJSONRoute` parse the body here first, so these become 400 "not valid JSON" errors that
say where.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """Where the first string (key or value) holding an unpaired surrogate is, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the body"
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            found = lone_surrogate_path(key, f"a key in {path or 'the body'}") or \
                lone_surrogate_path(item, sub)
            if found is not None:
                return found.encode("utf-8", "backslashreplace").decode("utf-8")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def parse_json(body: bytes) -> Any:
    def no_constant(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)

    try:
        value = json.loads(body, parse_constant=no_constant)
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 ({exc.reason})", "", 0) from None
    where = lone_surrogate_path(value)
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
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
