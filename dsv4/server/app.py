"""The FastAPI application: routers, auth, metrics, health, and the engine's lifetime."""

from __future__ import annotations

import os
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv4.chat import Tokenizer
from dsv4.engine.llm_engine import LLMEngine
from dsv4.server import anthropic_api, openai_api
from dsv4.server.config import ServerArgs
from dsv4.server.engine_loop import AsyncEngine
from dsv4.server.errors import APIError, error_response, install_error_handlers
from dsv4.server.metrics import ServerMetrics
from dsv4.server.service import Service
from dsv4.server.streaming import ClientDisconnected

KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
                "/v1/messages/count_tokens", "/health", "/metrics")


def build_engine(args: ServerArgs) -> tuple[LLMEngine, Tokenizer]:
    """Load the model folder into an LLMEngine with its tokenizer."""
    from dsv4.engine.llm import LLM

    tokenizer = Tokenizer.from_folder(args.model)
    llm = LLM(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        num_speculative_tokens=args.num_speculative_tokens,
        compile=args.compile,
        tokenizer=tokenizer,
    )
    return llm.engine, tokenizer


class APIKeyMiddleware:
    """Every /v1 route needs the key, as `Authorization: Bearer KEY` or `x-api-key: KEY`."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key and scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", [])}
            given = [headers["x-api-key"]] if "x-api-key" in headers else []
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given.append(auth[7:].strip())
            key = self.api_key.encode()
            if not any(secrets.compare_digest(g.encode(), key) for g in given):
                message = ("invalid API key" if given else "missing API key: send "
                           "'Authorization: Bearer KEY' or 'x-api-key: KEY'")
                err = APIError(message, status=401, code="invalid_api_key")
                await error_response(Request(scope), err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeMiddleware:
    """A body larger than `max_bytes` gets 413 before it is read (by its Content-Length) or
    as soon as it has grown past the limit (a chunked body)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> APIError:
        return APIError(f"the request body is {size} bytes, more than this server accepts "
                        f"({self.max_bytes}, --max-request-bytes)", status=413,
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            err = self._too_large(declared.decode())
            await error_response(Request(scope), err)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large(f"over {received}")
            return message

        await self.app(scope, limited, send)


class RequestMetricsMiddleware:
    """Counts finished HTTP requests by route and status code."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else (
            "/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.requests.inc(route=route, status=str(status["code"]))


def create_app(
    args: ServerArgs, engine: LLMEngine | None = None, tokenizer: Tokenizer | None = None
) -> FastAPI:
    """The server for `args.model` (or for an engine and tokenizer built elsewhere)."""
    import torch

    threads = args.torch_threads
    if threads is None and args.device in (None, "cpu"):
        # leave a core to the event loop (and a client on the same box): on 2 cores two
        # OpenMP threads that keep losing their core to it run 40-60% slower than one
        threads = max(1, (os.cpu_count() or 1) - 1)
    if threads is not None:
        torch.set_num_threads(threads)
    if engine is None or tokenizer is None:
        engine, tokenizer = build_engine(args)
    async_engine = AsyncEngine(engine, max_queue=args.max_queue)
    metrics = ServerMetrics(async_engine.stats)
    service = Service(async_engine, tokenizer, args.served_model_names, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        await async_engine.shutdown(args.shutdown_timeout_s)

    app = FastAPI(title="dsv4", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.args = args
    app.state.engine = async_engine
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)

    app.include_router(openai_api.router)
    app.include_router(anthropic_api.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = async_engine.is_alive
        body = {"status": "ok" if ok else "unavailable",
                "num_unfinished_seqs": async_engine.num_unfinished_seqs}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodySizeMiddleware, max_bytes=args.max_request_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=args.api_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
