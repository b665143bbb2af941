"""API errors and their bodies: OpenAI's {"error": {message, type, param, code}} everywhere,
Anthropic's {"type": "error", "error": {type, message}} on /v1/messages.

Every error a client can cause becomes a 4xx here, naming the field; pydantic's validation
errors included (FastAPI would answer 422 with its own body).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.server.engine_loop import EngineStoppedError, QueueFullError

log = logging.getLogger("dsv4.server")

# status -> (OpenAI error type, Anthropic error type)
ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("service_unavailable", "overloaded_error"),
}


class ErrorJSONResponse(JSONResponse):
    """ASCII-escaped: an error may quote what the client sent, valid Unicode or not."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error answered to the client: status, message, and the request field at fault."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}


def is_anthropic_route(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def error_response(request: Request, err: APIError) -> JSONResponse:
    openai_type, anthropic_type = ERROR_TYPES.get(
        err.status, ERROR_TYPES[500] if err.status >= 500 else ERROR_TYPES[400]
    )
    if is_anthropic_route(request):
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": anthropic_type, "message": err.message},
        }
    else:
        body = {
            "error": {
                "message": err.message,
                "type": openai_type,
                "param": err.param,
                "code": err.code,
            }
        }
    return ErrorJSONResponse(body, status_code=err.status, headers=err.headers)


def error_event_body(request: Request, err: APIError) -> dict:
    """The body of an error sent inside an event stream that has already begun."""
    openai_type, anthropic_type = ERROR_TYPES.get(err.status, ERROR_TYPES[500])
    if is_anthropic_route(request):
        return {"type": "error", "error": {"type": anthropic_type, "message": err.message}}
    return {"error": {"message": err.message, "type": openai_type, "param": err.param,
                      "code": err.code}}


# pydantic's loc holds union-member tags ("str", "list[ContentBlock]", "function-after[...]")
# besides field names; they are not fields a client wrote. Without the body to check against,
# these patterns are dropped.
_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|null)$|[\[\]()]|^function-|^json-or-")
_NO_BODY = object()


def field_path(loc: tuple | list, body: Any = _NO_BODY) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'. Given the request body,
    only the parts that index into it are kept (and a last, missing key), which drops union
    members, tagged-union tags and model names ("tool_choice.NamedToolChoice")."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out, value = "", body
    for i, part in enumerate(parts):
        if body is _NO_BODY:
            keep = isinstance(part, int) or not _TAG.search(str(part))
        elif isinstance(part, int) and isinstance(value, list) and 0 <= part < len(value):
            keep, value = True, value[part]
        elif isinstance(part, str) and isinstance(value, dict) and part in value:
            keep, value = True, value[part]
        else:  # a missing field is named last; anything else indexes nothing the client sent
            keep = isinstance(part, str) and isinstance(value, dict) and i == len(parts) - 1
        if keep:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or None


def _is_type_mismatch(err: dict) -> bool:
    return str(err.get("type", "")).endswith("_type")


def validation_error(errors: list[dict], body: Any = _NO_BODY) -> APIError:
    if not errors:
        return APIError("the request body is invalid")
    err = errors[0]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(f"the request body is not valid JSON ({detail})", code="invalid_json")

    def path(e: dict) -> str:
        return field_path(e.get("loc", ()), body) or ""

    # A value that fits no member of a union yields one error per member. The one that got
    # deepest into the value says most (a bad block inside a list beats "not a string"); at
    # the same depth, a bad value ("at most 16 items") beats a wrong type; if every member
    # refused the type, the message lists what each would take.
    first = path(err)
    same_field = [e for e in errors if path(e) == first or
                  path(e).startswith((f"{first}.", f"{first}["))] or [err]
    deepest = max(len(path(e)) for e in same_field)
    tied = [e for e in same_field if len(path(e)) == deepest]
    err = next((e for e in tied if not _is_type_mismatch(e)), tied[0])
    msg = str(err.get("msg", "is invalid"))
    if _is_type_mismatch(err):
        lead = "Input should be "
        wanted = list(dict.fromkeys(str(e.get("msg", "")) for e in tied))
        if len(wanted) > 1 and all(m.startswith(lead) for m in wanted):
            msg = lead + ", or ".join(m[len(lead):] for m in wanted)
    param = path(err) or None
    if param is None:
        if err.get("type") == "missing":
            msg = "the request body is empty; send the request as a JSON object"
        elif err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            msg = "the request body must be a JSON object"
        return APIError(msg, code="invalid_request_body")
    return APIError(f"{param}: {msg}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = getattr(exc, "body", None)
        return error_response(request, validation_error(list(exc.errors()),
                                                        _NO_BODY if body is None else body))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400:
            message = f"the request body could not be parsed ({message})"
        return error_response(
            request, APIError(message, status=exc.status_code, headers=exc.headers)
        )

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(request, queue_full(exc))

    @app.exception_handler(EngineStoppedError)
    async def _stopped(request: Request, exc: EngineStoppedError) -> JSONResponse:
        return error_response(request, APIError(str(exc), status=503, code="shutting_down"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(
            request, APIError(f"internal server error: {type(exc).__name__}", status=500)
        )


def queue_full(exc: QueueFullError) -> APIError:
    return APIError(
        str(exc),
        status=429,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(exc.retry_after_s)},
    )
