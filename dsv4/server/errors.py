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
# besides field names; they are not fields a client wrote.
_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|null)$|[\[\]()]|^function-|^json-or-")


def field_path(loc: tuple | list) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _TAG.search(part):
            out += f".{part}" if out else part
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    if not errors:
        return APIError("the request body is invalid")
    err = errors[0]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(f"the request body is not valid JSON ({detail})", code="invalid_json")
    # A value that fits no member of a union yields one error per member; the one that got
    # deepest into the value says most (a bad block inside a list beats "not a string").
    first_path = field_path(err.get("loc", ()))
    same_field = [e for e in errors
                  if (field_path(e.get("loc", ())) or "").startswith(first_path or "")]
    err = max(same_field or [err], key=lambda e: len(field_path(e.get("loc", ())) or ""))
    param = field_path(err.get("loc", ()))
    msg = str(err.get("msg", "is invalid"))
    if param is None:
        if err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            msg = "the request body must be a JSON object"
        return APIError(msg, code="invalid_request_body")
    return APIError(f"{param}: {msg}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_error(list(exc.errors())))

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
