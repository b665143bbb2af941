"""Anthropic Messages API: POST /v1/messages (what Claude Code speaks) and count_tokens.

Anthropic turns are mapped onto the OpenAI-form conversation that V4's encoder reads:
thinking blocks -> reasoning_content, tool_use -> tool_calls, tool_result -> tool messages.
Thinking is off unless `thinking` is enabled (Anthropic's default).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dsv4.chat import ContentDelta, ReasoningDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart
from dsv4.server.errors import APIError, error_event_body
from dsv4.server.json_body import StrictJSONRoute
from dsv4.server.schemas import (
    AnthropicMessage,
    CountTokensRequest,
    ImageBlock,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from dsv4.server.service import GenerationRun, Plan, Service, ToolChoice, new_id, resolve_thinking
from dsv4.server.streaming import SSEResponse, sse, until_disconnect

router = APIRouter(route_class=StrictJSONRoute)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "abort": "end_turn"}


def _service(request: Request) -> Service:
    return request.app.state.service


def _result_text(block: ToolResultBlock, where: str) -> str:
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    parts = []
    for j, part in enumerate(block.content):
        if not isinstance(part, TextBlock):
            raise APIError(f"{where}.content[{j}]: only text tool results are supported "
                           f"(got {part.type})", param=f"{where}.content[{j}]")
        parts.append(part.text)
    return "\n".join(parts)


def _messages(system: str | list[TextBlock] | None,
              turns: list[AnthropicMessage]) -> list[dict]:
    """Anthropic system + turns -> OpenAI-form messages for the V4 encoder."""
    out: list[dict] = []
    if system:
        text = system if isinstance(system, str) else "\n".join(b.text for b in system)
        out.append({"role": "system", "content": text})
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        blocks = [TextBlock(type="text", text=turn.content)] if isinstance(turn.content, str) \
            else turn.content
        texts, reasoning, calls = [], [], []
        for j, block in enumerate(blocks):
            at = f"{where}.content[{j}]"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ThinkingBlock):
                if turn.role == "assistant":
                    reasoning.append(block.thinking)
            elif isinstance(block, RedactedThinkingBlock):
                continue
            elif isinstance(block, ToolUseBlock) and turn.role == "assistant":
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name,
                                           "arguments": json.dumps(block.input)}})
            elif isinstance(block, ToolResultBlock) and turn.role == "user":
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": _result_text(block, at)})
            elif isinstance(block, ImageBlock):
                raise APIError(f"{at}: this model reads text only; images are not supported",
                               param=at)
            elif isinstance(block, ToolResultBlock):  # in an assistant message
                raise APIError(f"{at}: a tool_result block is not allowed in an assistant "
                               "message; put it in the user message that follows", param=at)
            elif isinstance(block, ToolUseBlock):  # in a user message
                raise APIError(f"{at}: a tool_use block is not allowed in a user message; "
                               "tool calls are the assistant's", param=at)
            else:
                raise APIError(f"{at}: this model reads text only; {block.type} blocks are not "
                               "supported", param=at)
        if turn.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif texts or not any(m["role"] == "tool" for m in out[-1:]):
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _tool_choice(body: CountTokensRequest | MessagesRequest) -> ToolChoice:
    choice = body.tool_choice
    if choice is None:
        return ToolChoice("auto" if body.tools else "none")
    if choice.type == "tool":
        if not choice.name:
            raise APIError("tool_choice.name is required when tool_choice.type is 'tool'",
                           param="tool_choice.name")
        return ToolChoice("function", choice.name)
    return ToolChoice({"auto": "auto", "any": "required", "none": "none"}[choice.type])


def _plan(svc: Service, body: CountTokensRequest | MessagesRequest, params) -> Plan:
    svc.check_model(body.model)
    enabled = None if body.thinking is None else body.thinking.type != "disabled"
    effort = body.output_config.effort if body.output_config else None
    mode, effort = resolve_thinking(enabled, effort, default=False)
    tools = [{"type": "function", "function": {"name": t.name,
                                               "description": t.description or "",
                                               "parameters": t.input_schema}}
             for t in body.tools or []]
    return svc.plan_chat(_messages(body.system, body.messages), params, tools=tools or None,
                         tool_choice=_tool_choice(body), thinking_mode=mode, effort=effort,
                         call_id_prefix="toolu_")


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    svc = _service(request)
    plan = _plan(svc, body, svc.sampling_params(max_tokens=1))
    return {"input_tokens": len(plan.prompt_ids)}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    svc = _service(request)
    params = svc.sampling_params(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        max_tokens=body.max_tokens, stop=body.stop_sequences, skip_special_tokens=False,
        names={"stop": "stop_sequences"},
    )
    plan = _plan(svc, body, params)
    svc.check_length(len(plan.prompt_ids), params, "messages", "max_tokens")
    message_id = new_id("msg_")
    run = await svc.start(message_id, plan)
    if body.stream:
        return SSEResponse(_stream(request, run, body, message_id))
    return JSONResponse(await until_disconnect(request, _result(run, body, message_id)))


class _Blocks:
    """Parser events -> Anthropic content-block events: ("start", index, block),
    ("delta", index, delta), ("stop", index)."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # type of the open block
        self.stop_sequence: str | None = None
        self.finish: str | None = None

    def _start(self, kind: str, block: dict) -> Iterator[tuple]:
        yield from self.close()
        self.index += 1
        self.open = kind
        yield ("start", self.index, block)

    def close(self) -> Iterator[tuple]:
        if self.open is not None:
            self.open = None
            yield ("stop", self.index)

    def feed(self, events: list) -> Iterator[tuple]:
        for e in events:
            if isinstance(e, ReasoningDelta) and e.text:
                if self.open != "thinking":
                    yield from self._start("thinking", {"type": "thinking", "thinking": "",
                                                        "signature": ""})
                yield ("delta", self.index, {"type": "thinking_delta", "thinking": e.text})
            elif isinstance(e, ContentDelta) and e.text:
                if self.open != "text":
                    yield from self._start("text", {"type": "text", "text": ""})
                yield ("delta", self.index, {"type": "text_delta", "text": e.text})
            elif isinstance(e, ToolCallStart):
                yield from self._start("tool_use", {"type": "tool_use", "id": e.id,
                                                    "name": e.name, "input": {}})
            elif isinstance(e, ToolCallArgsDelta) and self.open == "tool_use":
                yield ("delta", self.index, {"type": "input_json_delta",
                                             "partial_json": e.json_fragment})
            elif isinstance(e, ToolCallEnd):
                yield from self.close()

    def stop_reason(self) -> str:
        if self.finish == "stop" and self.stop_sequence is not None:
            return "stop_sequence"
        return STOP_REASONS.get(self.finish or "stop", "end_turn")


def _usage(run: GenerationRun) -> dict:
    return {"input_tokens": run.usage.prompt_tokens, "output_tokens": run.usage.completion_tokens}


async def _result(run: GenerationRun, body: MessagesRequest, message_id: str) -> dict:
    blocks = _Blocks()
    content: list[dict] = []
    partial_json: dict[int, list[str]] = {}
    try:
        async for updates in run:
            for u in updates:
                if u.finish_reason is not None:
                    blocks.finish, blocks.stop_sequence = u.finish_reason, u.stop_sequence
                for ev in [*blocks.feed(u.events), *(blocks.close() if u.finish_reason else [])]:
                    if ev[0] == "start":
                        content.append(dict(ev[2]))
                    elif ev[0] == "delta":
                        delta, block = ev[2], content[ev[1]]
                        if delta["type"] == "text_delta":
                            block["text"] += delta["text"]
                        elif delta["type"] == "thinking_delta":
                            block["thinking"] += delta["thinking"]
                        else:
                            partial_json.setdefault(ev[1], []).append(delta["partial_json"])
    finally:
        await run.aclose()
    for index, parts in partial_json.items():
        try:
            content[index]["input"] = json.loads("".join(parts))
        except json.JSONDecodeError:  # keep the bytes the model produced
            content[index]["input"] = {"_raw_arguments": "".join(parts)}
    return {"id": message_id, "type": "message", "role": "assistant", "model": body.model,
            "content": content, "stop_reason": blocks.stop_reason(),
            "stop_sequence": blocks.stop_sequence, "usage": _usage(run)}


async def _stream(request: Request, run: GenerationRun, body: MessagesRequest,
                  message_id: str) -> AsyncIterator[str]:
    blocks = _Blocks()
    start = {"id": message_id, "type": "message", "role": "assistant", "model": body.model,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": run.usage.prompt_tokens, "output_tokens": 0}}
    yield sse({"type": "message_start", "message": start}, "message_start")
    try:
        async for updates in run:
            for u in updates:
                if u.finish_reason is not None:
                    blocks.finish, blocks.stop_sequence = u.finish_reason, u.stop_sequence
                events = [*blocks.feed(u.events), *(blocks.close() if u.finish_reason else [])]
                for ev in events:
                    if ev[0] == "start":
                        data = {"type": "content_block_start", "index": ev[1],
                                "content_block": ev[2]}
                        yield sse(data, "content_block_start")
                    elif ev[0] == "delta":
                        data = {"type": "content_block_delta", "index": ev[1], "delta": ev[2]}
                        yield sse(data, "content_block_delta")
                    else:
                        yield sse({"type": "content_block_stop", "index": ev[1]},
                                  "content_block_stop")
        for ev in blocks.close():
            yield sse({"type": "content_block_stop", "index": ev[1]}, "content_block_stop")
        delta = {"type": "message_delta",
                 "delta": {"stop_reason": blocks.stop_reason(),
                           "stop_sequence": blocks.stop_sequence},
                 "usage": _usage(run)}
        yield sse(delta, "message_delta")
        yield sse({"type": "message_stop"}, "message_stop")
    except APIError as exc:
        yield sse(error_event_body(request, exc), "error")
    except Exception as exc:
        err = APIError(f"generation stopped: {exc}", status=503)
        yield sse(error_event_body(request, err), "error")
    finally:
        await run.aclose()

