"""One streamed request to an OpenAI-compatible endpoint -> a RequestRecord.

Speaks plain HTTP + server-sent events through httpx, so it measures any server the same way:
dsv4, vLLM, SGLang, vllm-ascend or a hosted API. A request that fails (HTTP error, broken
stream, no token, timeout) comes back as a record with `success=False` and the error text;
nothing is dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from dsv4.bench.datasets import SampleRequest
from dsv4.bench.records import RequestRecord


@dataclass
class Endpoint:
    """Where and how to send requests."""

    base_url: str
    model: str = ""
    path: str = "/v1/chat/completions"
    api_key: str | None = None
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"--base-url {self.base_url!r} must start with http:// or https://, "
                "e.g. http://127.0.0.1:8000"
            )
        self.base_url = self.base_url.rstrip("/")
        if not self.path.startswith("/"):
            self.path = "/" + self.path
        if not self.path.endswith("completions"):
            raise ValueError(
                f"--endpoint {self.path!r} is neither a chat nor a completions endpoint; "
                "use /v1/chat/completions or /v1/completions"
            )

    @property
    def kind(self) -> str:
        return "chat" if self.path.endswith("chat/completions") else "completions"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def build_payload(endpoint: Endpoint, sample: SampleRequest) -> dict[str, Any]:
    """The JSON body: streaming with usage in the last chunk, `max_tokens` = expected output."""
    payload: dict[str, Any] = {
        "model": endpoint.model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint.kind == "chat":
        payload["messages"] = sample.messages or [{"role": "user", "content": sample.prompt}]
    else:
        if sample.messages:
            raise ValueError(
                "a chat-format sample (messages) cannot go to a completions endpoint; "
                "use --endpoint /v1/chat/completions"
            )
        payload["prompt"] = sample.prompt
    if sample.output_len is not None:
        payload["max_tokens"] = sample.output_len  # the name every OpenAI-compatible server takes
    if endpoint.ignore_eos:
        payload["ignore_eos"] = True  # vLLM/SGLang/dsv4 extension: generate exactly max_tokens
    payload.update(endpoint.extra_body)
    return payload


def _error_text(status: int, body: bytes) -> str:
    """A short reason from an error response, OpenAI-style body or not."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return f"HTTP {status}: {text[:300]}"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)[:300]
        else:
            msg = str(err)
        return f"HTTP {status}: {msg}"
    return f"HTTP {status}: {text[:300]}"


def _apply_usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    if usage.get("prompt_tokens") is not None:
        record.usage_prompt_tokens = int(usage["prompt_tokens"])
    if usage.get("completion_tokens") is not None:
        record.usage_completion_tokens = int(usage["completion_tokens"])
    details = usage.get("completion_tokens_details") or {}
    if details.get("reasoning_tokens") is not None:
        record.usage_reasoning_tokens = int(details["reasoning_tokens"])


def apply_event(record: RequestRecord, data: dict[str, Any], t_s: float, kind: str) -> None:
    """Fold one parsed SSE event, received `t_s` after send, into the record."""
    if data.get("error"):
        err = data["error"]
        record.error = "stream error: " + (
            err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
        )
        return
    choices = data.get("choices") or []
    if choices:
        choice = choices[0]
        if kind == "chat":
            delta = choice.get("delta") or {}
            content = delta.get("content") or ""
            # DeepSeek/vLLM name it reasoning_content; some servers use reasoning.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        else:
            content, reasoning = choice.get("text") or "", ""
        if content or reasoning:
            if record.ttft_s is None:
                record.ttft_s = t_s
            if content and record.ttfc_s is None:
                record.ttfc_s = t_s
            record.token_times_s.append(t_s)
            record.output_text += content
            record.reasoning_text += reasoning
        record.end_s = t_s  # every choices chunk, the finish chunk included, advances the end
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    if data.get("usage"):
        _apply_usage(record, data["usage"])


async def send_request(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    sample: SampleRequest,
    index: int,
    bench_start_s: float,
) -> RequestRecord:
    """Send one streaming request and time every chunk; never raises for request failures."""
    record = RequestRecord(
        index=index, prompt_len=sample.prompt_len, expected_output_len=sample.output_len
    )
    payload = build_payload(endpoint, sample)
    send_s = time.perf_counter()
    record.send_time_s = send_s - bench_start_s
    saw_done = False
    try:
        async with client.stream(
            "POST", endpoint.url, json=payload, headers=endpoint.headers()
        ) as response:
            record.http_status = response.status_code
            if response.status_code != 200:
                record.error = _error_text(response.status_code, await response.aread())
                return record
            async for line in response.aiter_lines():
                t_s = time.perf_counter() - send_s
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                body = line[len("data:") :].strip()
                if body == "[DONE]":
                    # keep reading to the end of the body: a response left half-read makes
                    # httpx drop its connection, and the next request would pay a new connect
                    saw_done = True
                    continue
                try:
                    data = json.loads(body)
                except ValueError:
                    record.error = f"malformed SSE data: {body[:200]!r}"
                    return record
                apply_event(record, data, t_s, endpoint.kind)
                if record.error:
                    return record
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return record
    if record.ttft_s is None:
        record.error = "stream ended without any generated token"
    elif not saw_done and record.finish_reason is None:
        record.error = "stream closed before finish_reason or [DONE]"
    else:
        record.success = True
    return record


async def fetch_models(client: httpx.AsyncClient, endpoint: Endpoint) -> dict[str, Any]:
    """The server's GET /v1/models answer, or {'error': ...} when it has none."""
    url = endpoint.base_url + "/v1/models"
    try:
        response = await client.get(url, headers=endpoint.headers())
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if response.status_code != 200:
        return {"error": _error_text(response.status_code, response.content)}
    try:
        return response.json()
    except ValueError:
        return {"error": f"/v1/models answered non-JSON: {response.text[:200]!r}"}


def first_model_id(models: dict[str, Any]) -> str | None:
    data = models.get("data") or []
    return data[0].get("id") if data and isinstance(data[0], dict) else None
