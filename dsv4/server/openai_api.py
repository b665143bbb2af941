"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dsv4.chat import ContentDelta, ReasoningDelta, ToolCallArgsDelta, ToolCallStart
from dsv4.engine.request import TokenLogprobs
from dsv4.server.errors import APIError, error_event_body
from dsv4.server.json_body import StrictJSONRoute
from dsv4.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from dsv4.server.service import (
    ChoiceUpdate,
    GenerationRun,
    Plan,
    Service,
    ToolChoice,
    Usage,
    logprob_value,
    new_id,
    resolve_thinking,
)
from dsv4.server.streaming import SSEResponse, sse, until_disconnect

router = APIRouter(route_class=StrictJSONRoute)


def _service(request: Request) -> Service:
    return request.app.state.service


# --------------------------------------------------------------------------- models


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    svc = _service(request)
    return {"object": "list", "data": [_model_card(svc, name) for name in svc.model_names]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    svc = _service(request)
    svc.check_model(model_id)
    return _model_card(svc, model_id)


def _model_card(svc: Service, name: str) -> dict:
    return {"id": name, "object": "model", "created": svc.created, "owned_by": "dsv4",
            "max_model_len": svc.engine.max_seq_len}


# --------------------------------------------------------------------------- chat


def _message_dict(m: ChatMessage) -> dict:
    out: dict[str, Any] = {"role": m.role}
    if isinstance(m.content, list):
        out["content"] = [p.model_dump(exclude_none=True) for p in m.content]
    else:
        out["content"] = m.content
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id or "", "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content
    return out


def _thinking(body: ChatCompletionRequest) -> tuple[str, str | None]:
    """DeepSeek's switch (`thinking`), else chat_template_kwargs; thinking is on by default,
    as on DeepSeek's API."""
    kwargs = body.chat_template_kwargs or {}
    enabled: bool | None = None
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise APIError(f"chat_template_kwargs.{key} must be true or false",
                               param=f"chat_template_kwargs.{key}")
            enabled = kwargs[key]
    if "thinking_mode" in kwargs:
        if kwargs["thinking_mode"] not in ("chat", "thinking"):
            raise APIError("chat_template_kwargs.thinking_mode must be 'chat' or 'thinking'",
                           param="chat_template_kwargs.thinking_mode")
        enabled = kwargs["thinking_mode"] == "thinking"
    effort = body.reasoning_effort
    if effort is None and "reasoning_effort" in kwargs:
        effort = kwargs["reasoning_effort"]
        if effort not in (None, "none", "minimal", "low", "medium", "high", "xhigh", "max",
                          "ultra"):
            raise APIError(f"chat_template_kwargs.reasoning_effort={effort!r} is not an "
                           "effort (low, medium, high, max)",
                           param="chat_template_kwargs.reasoning_effort")
    if body.thinking is not None:
        enabled = body.thinking.type == "enabled"
    return resolve_thinking(enabled, effort, default=True)


def _tool_choice(body: ChatCompletionRequest) -> ToolChoice:
    choice = body.tool_choice
    if choice is None:
        return ToolChoice("auto" if body.tools else "none")
    if isinstance(choice, str):
        return ToolChoice(choice)
    return ToolChoice("function", choice.function.name)


def _chat_plan(svc: Service, body: ChatCompletionRequest) -> tuple[Plan, str]:
    svc.check_model(body.model)
    if body.logit_bias:
        raise APIError("logit_bias is not supported by this server", param="logit_bias")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else \
        "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = svc.sampling_params(
        names={"max_tokens": max_param},
        n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        min_p=body.min_p, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        seed=body.seed, max_tokens=max_tokens, min_tokens=body.min_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop,
        stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        skip_special_tokens=False,  # the parser needs the markup
    )
    mode, effort = _thinking(body)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    plan = svc.plan_chat(
        [_message_dict(m) for m in body.messages], params, tools=tools,
        tool_choice=_tool_choice(body), thinking_mode=mode, effort=effort,
    )
    svc.check_length(len(plan.prompt_ids), params, "messages", max_param)
    return plan, max_param


def _usage(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _chat_logprobs(svc: Service, lps: list[TokenLogprobs]) -> list[dict]:
    def entry(token_id: int, lp: float) -> dict:
        text = svc.token_text(token_id)
        return {"token": text, "logprob": logprob_value(lp), "bytes": list(text.encode())}

    return [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in lps
    ]


def _deltas(events: list) -> list[dict]:
    """Parser events of one step as OpenAI deltas (runs of one kind merged)."""
    deltas: list[dict] = []
    for e in events:
        last = deltas[-1] if deltas else None
        if isinstance(e, (ContentDelta, ReasoningDelta)):
            key = "content" if isinstance(e, ContentDelta) else "reasoning_content"
            if last is not None and list(last) == [key]:
                last[key] += e.text
            else:
                deltas.append({key: e.text})
        elif isinstance(e, ToolCallStart):
            deltas.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                           "function": {"name": e.name, "arguments": ""}}]})
        elif isinstance(e, ToolCallArgsDelta):
            calls = last.get("tool_calls") if last is not None else None
            if calls and calls[0]["index"] == e.index:
                calls[0]["function"]["arguments"] += e.json_fragment
            else:
                deltas.append({"tool_calls": [{"index": e.index,
                                               "function": {"arguments": e.json_fragment}}]})
    return deltas


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    svc = _service(request)
    plan, _ = _chat_plan(svc, body)
    request_id = new_id("chatcmpl-")
    run = await svc.start(request_id, plan)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_chat_stream(svc, request, run, body, request_id, include_usage))
    return JSONResponse(await until_disconnect(request, _chat_result(svc, run, body, request_id)))


def _fold_chat(svc: Service, updates: list[ChoiceUpdate], body: ChatCompletionRequest,
               content: list, reasoning: list, calls: list, logprobs: list,
               finish: list) -> None:
    for u in updates:
        for e in u.events:
            if isinstance(e, ContentDelta):
                content[u.index].append(e.text)
            elif isinstance(e, ReasoningDelta):
                reasoning[u.index].append(e.text)
            elif isinstance(e, ToolCallStart):
                calls[u.index].append({"id": e.id, "type": "function",
                                       "function": {"name": e.name, "arguments": ""}})
            elif isinstance(e, ToolCallArgsDelta):
                calls[u.index][e.index]["function"]["arguments"] += e.json_fragment
        if body.logprobs:
            logprobs[u.index] += _chat_logprobs(svc, u.logprobs)
        if u.finish_reason is not None:
            finish[u.index] = u.finish_reason


async def _chat_result(svc: Service, run: GenerationRun, body: ChatCompletionRequest,
                       request_id: str) -> dict:
    n = run.plan.params.n
    content: list[list[str]] = [[] for _ in range(n)]
    reasoning: list[list[str]] = [[] for _ in range(n)]
    calls: list[list[dict]] = [[] for _ in range(n)]
    logprobs: list[list[dict]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    try:
        async for updates in run:
            _fold_chat(svc, updates, body, content, reasoning, calls, logprobs, finish)
    finally:
        await run.aclose()
    thinking = run.plan.thinking_mode == "thinking"
    choices = []
    for i in range(n):
        text = "".join(content[i])
        message: dict[str, Any] = {"role": "assistant",
                                   "content": text if text or not calls[i] else None}
        if thinking or reasoning[i]:
            message["reasoning_content"] = "".join(reasoning[i])
        if calls[i]:
            message["tool_calls"] = calls[i]
        choices.append({"index": i, "message": message,
                        "logprobs": {"content": logprobs[i]} if body.logprobs else None,
                        "finish_reason": finish[i]})
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "choices": choices, "usage": _usage(run.usage),
            "system_fingerprint": None}


async def _chat_stream(svc: Service, request: Request, run: GenerationRun,
                       body: ChatCompletionRequest, request_id: str,
                       include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": body.model, "choices": choices, "system_fingerprint": None}
        if include_usage:
            data["usage"] = usage
        return sse(data)

    def choice(index: int, delta: dict, logprobs: list | None = None,
               finish: str | None = None) -> dict:
        return {"index": index, "delta": delta,
                "logprobs": {"content": logprobs} if logprobs is not None else None,
                "finish_reason": finish}

    try:
        for i in range(run.plan.params.n):
            yield chunk([choice(i, {"role": "assistant", "content": ""})])
        async for updates in run:
            for u in updates:
                deltas = _deltas(u.events)
                lps = _chat_logprobs(svc, u.logprobs) if body.logprobs else None
                if lps and not deltas:
                    deltas = [{}]
                for k, delta in enumerate(deltas):
                    yield chunk([choice(u.index, delta, lps if k == 0 else None)])
                if u.finish_reason is not None:
                    yield chunk([choice(u.index, {}, None, u.finish_reason)])
        if include_usage:
            yield chunk([], _usage(run.usage))
    except APIError as exc:
        yield sse(error_event_body(request, exc))
    except Exception as exc:  # EngineStoppedError or a failed step: tell the client
        err = APIError(f"generation stopped: {exc}", status=503)
        yield sse(error_event_body(request, err))
    finally:
        await run.aclose()
    yield sse("[DONE]")


# --------------------------------------------------------------------------- completions


def _completion_prompts(svc: Service, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        prompts: list = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    return [svc.encode_text_prompt(x) for x in prompts]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    svc = _service(request)
    svc.check_model(body.model)
    if body.logit_bias:
        raise APIError("logit_bias is not supported by this server", param="logit_bias")
    if body.suffix:
        raise APIError("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError("best_of must equal n (no server-side ranking)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError("echo with logprobs needs prompt logprobs, which this server does not "
                       "compute", param="echo")
    params = svc.sampling_params(
        n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        min_p=body.min_p, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        seed=body.seed, max_tokens=body.max_tokens, min_tokens=body.min_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop,
        stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
        logprobs=body.logprobs, skip_special_tokens=body.skip_special_tokens,
    )
    prompts = _completion_prompts(svc, body)
    plans = [Plan(prompt_ids=ids, params=params) for ids in prompts]
    for plan in plans:
        svc.check_length(len(plan.prompt_ids), params, "prompt", "max_tokens")
    if len(plans) * params.n > svc.engine.capacity:
        raise APIError(f"{len(plans)} prompts x n={params.n} is more than this server can "
                       f"hold at once ({svc.engine.capacity})", param="prompt")
    request_id = new_id("cmpl-")
    runs: list[GenerationRun] = []
    try:
        for i, plan in enumerate(plans):
            runs.append(await svc.start(f"{request_id}-{i}", plan))
    except BaseException:
        for run in runs:
            await run.stream.aclose()
        raise
    echo = [svc.tokenizer.decode(p, skip_special_tokens=False) if body.echo else ""
            for p in prompts]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_completion_stream(svc, request, runs, body, request_id, echo,
                                              include_usage))
    return JSONResponse(await until_disconnect(
        request, _completion_result(svc, runs, body, request_id, echo)))


def _text_logprobs(svc: Service, lps: list[TokenLogprobs], offset: int) -> tuple[dict, int]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    for lp in lps:
        text = svc.token_text(lp.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob_value(lp.logprob))
        out["top_logprobs"].append({svc.token_text(t): logprob_value(v) for t, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


async def _merged(runs: list[GenerationRun]) -> AsyncIterator[tuple[int, list[ChoiceUpdate]]]:
    """The updates of several runs as they come: (run index, updates)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, run: GenerationRun) -> None:
        gen = run.__aiter__()
        try:
            async for updates in gen:
                await queue.put((i, updates))
            await queue.put((i, done))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await gen.aclose()

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(runs)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sum_usage(runs: list[GenerationRun]) -> Usage:
    usage = Usage(prompt_tokens=sum(r.usage.prompt_tokens for r in runs))
    usage.completion_tokens = sum(r.usage.completion_tokens for r in runs)
    return usage


async def _completion_result(svc: Service, runs: list[GenerationRun], body: CompletionRequest,
                             request_id: str, echo: list[str]) -> dict:
    n = runs[0].plan.params.n
    texts = [[echo[k // n]] for k in range(len(runs) * n)]
    logprobs: list[dict | None] = [None] * (len(runs) * n)
    offsets = [len(echo[k // n]) for k in range(len(runs) * n)]
    finish: list[str | None] = [None] * (len(runs) * n)
    async for r, updates in _merged(runs):
        for u in updates:
            k = r * n + u.index
            texts[k] += [e.text for e in u.events]
            if body.logprobs is not None:
                part, offsets[k] = _text_logprobs(svc, u.logprobs, offsets[k])
                if logprobs[k] is None:
                    logprobs[k] = part
                else:
                    for key, values in part.items():
                        logprobs[k][key] += values
            if u.finish_reason is not None:
                finish[k] = u.finish_reason
    choices = [{"index": k, "text": "".join(texts[k]), "logprobs": logprobs[k],
                "finish_reason": finish[k]} for k in range(len(texts))]
    usage = _sum_usage(runs)
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": body.model, "choices": choices,
            "usage": {"prompt_tokens": usage.prompt_tokens,
                      "completion_tokens": usage.completion_tokens,
                      "total_tokens": usage.total_tokens}}


async def _completion_stream(svc: Service, request: Request, runs: list[GenerationRun],
                             body: CompletionRequest, request_id: str, echo: list[str],
                             include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    n = runs[0].plan.params.n
    offsets = [len(echo[k // n]) for k in range(len(runs) * n)]

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = {"id": request_id, "object": "text_completion", "created": created,
                "model": body.model, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return sse(data)

    try:
        for k, text in enumerate(echo[k // n] for k in range(len(runs) * n)):
            if text:
                yield chunk([{"index": k, "text": text, "logprobs": None,
                              "finish_reason": None}])
        async for r, updates in _merged(runs):
            for u in updates:
                k = r * n + u.index
                text = "".join(e.text for e in u.events)
                lps = None
                if body.logprobs is not None:
                    lps, offsets[k] = _text_logprobs(svc, u.logprobs, offsets[k])
                if text or lps or u.finish_reason:
                    yield chunk([{"index": k, "text": text, "logprobs": lps,
                                  "finish_reason": u.finish_reason}])
        if include_usage:
            usage = _sum_usage(runs)
            yield chunk([], {"prompt_tokens": usage.prompt_tokens,
                             "completion_tokens": usage.completion_tokens,
                             "total_tokens": usage.total_tokens})
    except APIError as exc:
        yield sse(error_event_body(request, exc))
    except Exception as exc:
        yield sse(error_event_body(request, APIError(f"generation stopped: {exc}", status=503)))
    yield sse("[DONE]")

