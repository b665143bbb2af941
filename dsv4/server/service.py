"""What both APIs share: requests to prompts + SamplingParams, engine outputs to parsed deltas.

`Service.plan_chat` renders an OpenAI-form conversation with V4's encoder (tools, thinking
mode, reasoning effort, a forced tool call prefilled as the opening of a DSML block) and
tokenises it. `GenerationRun` follows one engine request's n samples and turns each step's
new text into parser events (reasoning, content, tool-call start / argument fragment / end),
with the new tokens' logprobs, finish reasons and usage. The OpenAI and Anthropic routers only
format these.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from dsv4.chat import (
    ChatEncodingError,
    ContentDelta,
    Finished,
    StreamParser,
    Tokenizer,
    ToolCallStart,
    encode_continuation,
    encode_messages,
)
from dsv4.chat.tokens import BOS, DSML, INVOKE_END, THINK_END, TOOL_CALLS_START
from dsv4.engine.request import CompletionOutput, TokenLogprobs
from dsv4.engine.sampling_params import SamplingParams
from dsv4.server.engine_loop import AsyncEngine, EngineStoppedError, QueueFullError, RequestStream
from dsv4.server.errors import APIError, queue_full
from dsv4.server.metrics import ServerMetrics

# Requested effort -> what V4's encoder knows: "max" adds the preamble; anything else is the
# default ("high"). As DeepSeek's API maps them; "none" turns thinking off.
EFFORTS = {"minimal": "high", "low": "high", "medium": "high", "high": "high",
           "xhigh": "high", "max": "max", "ultra": "max"}
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a zero probability (JSON has no -inf)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass
class ToolChoice:
    mode: str = "auto"  # auto | none | required | function
    name: str | None = None


@dataclass
class Plan:
    """What to generate: the prompt, the sampling, and how to read the output."""

    prompt_ids: list[int]
    params: SamplingParams
    thinking_mode: str | None = None  # None: raw text, no chat parsing
    continued: str = ""  # the client's own start of the answer (a final assistant message):
    # the parser reads it as model output, and it is not sent back
    prefill: str = ""  # the end of the prompt that the parser reads as model output, and sends
    tool_names: set[str] | None = None
    call_id_prefix: str = "call_"
    prompt_text: str = ""


@dataclass
class ChoiceUpdate:
    """What one sample produced in one step."""

    index: int
    events: list = field(default_factory=list)  # dsv4.chat parser events (no Finished)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_new_tokens: int = 0
    finish_reason: str | None = None  # stop | length | tool_calls | abort
    stop_sequence: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def resolve_thinking(
    enabled: bool | None, effort: str | None, default: bool
) -> tuple[str, str | None]:
    """(thinking_mode, encoder effort) from an explicit switch and a requested effort."""
    if effort == "none":
        return "chat", None
    if enabled is None:
        enabled = default or effort is not None
    if not enabled:
        return "chat", None
    return "thinking", EFFORTS.get(effort) if effort else None


class Service:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        model_names: list[str],
        metrics: ServerMetrics,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_names = list(model_names)
        self.metrics = metrics
        self.think_end_id = tokenizer.special_ids.get(THINK_END)
        self.created = int(time.time())

    # -- validation ------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise APIError(
                f"model {name!r} does not exist; this server serves {self.model_names}",
                status=404, param="model", code="model_not_found",
            )

    def sampling_params(self, names: dict[str, str] | None = None, **fields: Any) -> SamplingParams:
        """SamplingParams from API fields (None = the engine's default). A value the engine
        refuses becomes a 400 naming the API's field (`names` maps engine -> API names)."""
        names = names or {}
        given = {k: v for k, v in fields.items() if v is not None or k == "max_tokens"}
        n = given.get("n", 1)
        if n > self.engine.capacity:
            raise APIError(
                f"n={n} is more than this server can hold at once ({self.engine.capacity})",
                param="n",
            )
        try:
            return SamplingParams(**given)
        except ValueError as exc:
            match = re.search(r"SamplingParams\.(\w+)=", str(exc))
            field_name = match.group(1) if match else None
            param = names.get(field_name, field_name)
            message = str(exc).replace(f"SamplingParams.{field_name}", param or "")
            raise APIError(message, param=param) from None

    def check_length(
        self, num_prompt_tokens: int, params: SamplingParams, prompt_param: str,
        max_tokens_param: str,
    ) -> None:
        limit = self.engine.max_seq_len
        if num_prompt_tokens >= limit:
            raise APIError(
                f"the prompt is {num_prompt_tokens} tokens, but this model's context holds "
                f"{limit} tokens (prompt + output); shorten the prompt",
                param=prompt_param, code="context_length_exceeded",
            )
        mt = params.max_tokens
        if mt is not None and num_prompt_tokens + mt > limit:
            raise APIError(
                f"{max_tokens_param}={mt} is too large: the prompt is {num_prompt_tokens} "
                f"tokens and the context holds {limit}, so at most "
                f"{limit - num_prompt_tokens} tokens can be generated",
                param=max_tokens_param, code="context_length_exceeded",
            )

    # -- prompts ---------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None,
        tool_choice: ToolChoice,
        thinking_mode: str,
        effort: str | None,
    ) -> tuple[str, str, str]:
        """(prompt text, the continued assistant turn, prefill). A final assistant message
        (without tool calls) is a turn the model continues, as Anthropic's prefill is."""
        tools = tools or []
        names = [t["function"]["name"] for t in tools]
        if tool_choice.mode == "function" and tool_choice.name not in names:
            raise APIError(
                f"tool_choice names the function {tool_choice.name!r}, which is not among "
                f"the tools {names}", param="tool_choice",
            )
        if tool_choice.mode == "required" and not tools:
            raise APIError("tool_choice 'required' needs at least one tool", param="tool_choice")
        rendered = [dict(m) for m in messages]
        if tools and tool_choice.mode != "none":
            system = next((m for m in rendered if m.get("role") in ("system", "developer")), None)
            if system is None:
                system = {"role": "system", "content": ""}
                rendered.insert(0, system)
            system["tools"] = tools
        continued = ""
        try:
            if messages and messages[-1].get("role") == "assistant":
                prompt, continued = encode_continuation(rendered, thinking_mode,
                                                        reasoning_effort=effort)
            else:
                prompt = encode_messages(rendered, thinking_mode, reasoning_effort=effort)
        except ChatEncodingError as exc:  # its message starts with the message at fault
            where = str(exc).split(":")[0]
            raise APIError(str(exc), param=where if where.startswith("messages[") else
                           "messages") from None
        prefill = self._prefill(tool_choice, names, thinking_mode, prompt + continued)
        return prompt, continued, prefill

    @staticmethod
    def _prefill(choice: ToolChoice, names: list[str], thinking_mode: str, prompt: str) -> str:
        """A forced tool call is the opening of a DSML block written for the model. In
        thinking mode the reasoning is closed first (empty): no constrained decoding here,
        so the model cannot be made to call a tool after reasoning freely."""
        name = choice.name if choice.mode == "function" else None
        if choice.mode == "required" and len(names) == 1:
            name = names[0]
        if choice.mode not in ("function", "required"):
            return ""
        head = THINK_END if thinking_mode == "thinking" and not prompt.endswith(THINK_END) else ""
        block = f"\n\n{TOOL_CALLS_START}\n"
        if name is not None:
            block += f'<{DSML}invoke name="{name}">\n'
        return head + block

    def plan_chat(
        self,
        messages: list[dict],
        params: SamplingParams,
        *,
        tools: list[dict] | None = None,
        tool_choice: ToolChoice | None = None,
        thinking_mode: str = "chat",
        effort: str | None = None,
        call_id_prefix: str = "call_",
    ) -> Plan:
        tool_choice = tool_choice or ToolChoice()
        prompt, continued, prefill = self.render_chat(messages, tools, tool_choice,
                                                      thinking_mode, effort)
        text = prompt + continued + prefill
        names = {t["function"]["name"] for t in tools or []}
        if f'<{DSML}invoke name="' in prefill:
            # a named function (or the only tool, required) is called exactly once: the engine
            # ends the answer at the call's closing tag, whatever min_tokens asked for
            params = replace(params, stop_after=[*params.stop_after, INVOKE_END], min_tokens=0)
        return Plan(
            prompt_ids=self._encode(text, "messages"),
            params=params,
            thinking_mode=thinking_mode,
            continued=continued,
            prefill=prefill,
            tool_names=names if tool_choice.mode != "none" else set(),
            call_id_prefix=call_id_prefix,
            prompt_text=text,
        )

    def _encode(self, text: str, param: str) -> list[int]:
        """Token ids of `text`. A text too long for the context, however it is split, is
        refused before tokenisation, which would hold up every other request meanwhile."""
        limit = self.engine.max_seq_len
        at_least = len(text) // self.tokenizer.max_token_chars
        if at_least >= limit:
            raise APIError(
                f"the prompt is {len(text)} characters, at least {at_least} tokens, but this "
                f"model's context holds {limit} tokens (prompt + output); shorten the prompt",
                param=param, code="context_length_exceeded",
            )
        return self.tokenizer.encode(text)

    def encode_text_prompt(self, prompt: str | list[int]) -> list[int]:
        """A raw completion prompt: text gets the BOS the model was trained with (unless it
        already starts with it); token ids are taken as they are."""
        if isinstance(prompt, str):
            return self._encode(prompt if prompt.startswith(BOS) else BOS + prompt, "prompt")
        vocab = self.engine.engine.runner.vocab_size
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise APIError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                param="prompt",
            )
        return list(prompt)

    # -- running ---------------------------------------------------------------------------

    async def submit(self, request_id: str, plan: Plan) -> RequestStream:
        try:
            return await self.engine.add(request_id, plan.prompt_ids, plan.params)
        except QueueFullError as exc:
            self.metrics.rejected.inc()
            raise queue_full(exc) from None
        except EngineStoppedError as exc:
            raise APIError(str(exc), status=503, code="shutting_down") from None
        except ValueError as exc:  # the engine's own check: cannot ever fit
            raise APIError(str(exc), param=None, code="context_length_exceeded") from None

    async def start(self, request_id: str, plan: Plan) -> GenerationRun:
        arrival = time.perf_counter()
        stream = await self.submit(request_id, plan)
        return GenerationRun(self, plan, stream, arrival)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one Service per process
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class _Choice:
    """One sample's progress: text seen, parser, counts."""

    def __init__(self, plan: Plan, index: int, think_end_id: int | None) -> None:
        self.index = index
        self.plan = plan
        self.think_end_id = think_end_id
        self.parser = None
        if plan.thinking_mode is not None:
            prefix = plan.call_id_prefix
            self.parser = StreamParser(
                plan.thinking_mode, id_factory=lambda: new_id(prefix), tool_names=plan.tool_names
            )
        self.text = ""
        self.num_tokens = 0
        self.num_logprobs = 0
        self.has_tool_calls = False
        self.finished = False
        self.finish_reason: str | None = None
        self.reasoning_tokens = 0
        self.notes: list[str] = []

    def _parse(self, text: str, final: bool = False) -> list:
        if self.parser is None:
            return [ContentDelta(text)] if text else []
        events = self.parser.feed(text) if text else []
        if final:
            events += self.parser.finish()
        out = []
        for e in events:
            if isinstance(e, Finished):
                self.notes = e.notes
                continue
            if isinstance(e, ToolCallStart):
                self.has_tool_calls = True
            out.append(e)
        return out

    def start(self) -> ChoiceUpdate | None:
        self._parse(self.plan.continued)  # the client's own text: read, not sent back
        if not self.plan.prefill:
            return None
        return ChoiceUpdate(self.index, events=self._parse(self.plan.prefill))

    def advance(self, comp: CompletionOutput) -> ChoiceUpdate | None:
        if self.finished:
            return None
        new_text = ""
        if comp.text.startswith(self.text):  # a held-back tail may not have grown yet
            new_text, self.text = comp.text[len(self.text):], comp.text
        update = ChoiceUpdate(self.index, num_new_tokens=len(comp.token_ids) - self.num_tokens)
        self.num_tokens = len(comp.token_ids)
        if comp.logprobs:
            update.logprobs = comp.logprobs[self.num_logprobs:]
            self.num_logprobs = len(comp.logprobs)
        final = comp.finish_reason is not None
        update.events = self._parse(new_text, final)
        if final:
            self.finished = True
            self.reasoning_tokens = self._count_reasoning(comp.token_ids)
            reason = comp.finish_reason
            if reason == "stop" and self.has_tool_calls:
                reason = "tool_calls"
            update.finish_reason = self.finish_reason = reason
            if comp.stop_reason in self.plan.params.stop:  # the client's, not the call's end
                update.stop_sequence = comp.stop_reason
        if not (update.events or update.logprobs or update.num_new_tokens or self.finished):
            return None
        return update

    def _count_reasoning(self, token_ids: list[int]) -> int:
        plan = self.plan
        if plan.thinking_mode != "thinking" or (THINK_END in plan.continued
                                                 or plan.prefill.startswith(THINK_END)):
            return 0
        if self.think_end_id is not None and self.think_end_id in token_ids:
            return token_ids.index(self.think_end_id)
        return len(token_ids)


class GenerationRun:
    """Async iterator of lists of ChoiceUpdate, one list per engine step (the first holds what
    the prefill parses to). Closing it early aborts the engine request."""

    def __init__(self, service: Service, plan: Plan, stream: RequestStream, arrival_s: float):
        self.service = service
        self.plan = plan
        self.stream = stream
        self.arrival_s = arrival_s
        self.choices = [_Choice(plan, i, service.think_end_id) for i in range(plan.params.n)]
        self.usage = Usage(prompt_tokens=len(plan.prompt_ids))
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[list[ChoiceUpdate]]:
        metrics = self.service.metrics
        first = [u for c in self.choices if (u := c.start()) is not None]
        if first:
            yield first
        last_token_s: float | None = None
        try:
            async for out in self.stream:
                now = time.perf_counter()
                updates = []
                new_tokens = 0
                for comp in out.outputs:
                    update = self.choices[comp.index].advance(comp)
                    if update is not None:
                        updates.append(update)
                        new_tokens += update.num_new_tokens
                if new_tokens:
                    if last_token_s is None:
                        metrics.ttft.observe(now - self.arrival_s)
                    else:
                        gap = (now - last_token_s) / new_tokens
                        for _ in range(new_tokens):
                            metrics.itl.observe(gap)
                    last_token_s = now
                    self.usage.completion_tokens += new_tokens
                if updates:
                    yield updates
            self.finished = True
        finally:
            self._record()
            await self.stream.aclose()

    async def aclose(self) -> None:
        """Abort the engine request if it is still running (idempotent)."""
        await self.stream.aclose()

    def _record(self) -> None:
        m = self.service.metrics
        self.usage.reasoning_tokens = sum(c.reasoning_tokens for c in self.choices)
        m.prompt_tokens.inc(self.usage.prompt_tokens)
        m.generation_tokens.inc(self.usage.completion_tokens)
        m.prompt_len.observe(self.usage.prompt_tokens)
        m.gen_len.observe(self.usage.completion_tokens)
        if self.finished:
            m.e2e.observe(time.perf_counter() - self.arrival_s)
        for c in self.choices:
            m.finished.inc(reason=c.finish_reason or "abort")


def logprob_value(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


__all__ = [
    "ChoiceUpdate",
    "GenerationRun",
    "Plan",
    "Service",
    "ToolChoice",
    "Usage",
    "logprob_value",
    "new_id",
    "resolve_thinking",
]
