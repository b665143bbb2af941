"""Render an OpenAI-style conversation into DeepSeek-V4's prompt text.

V4 ships no chat template, only a Python encoder; this reproduces its output byte for byte
(checked against the reference encoder's golden vectors in tests/data/chat_encoding.json):

    BOS [effort preamble] system [tools block]
      ( <｜User｜>user | <｜latest_reminder｜>text
      | <｜Assistant｜>[<think>reasoning]</think>content[DSML calls]EOS )*
      <｜Assistant｜> (</think> | <think>)

Tool results become a user turn of <tool_result> blocks in the order of the calls they answer.
"""

from __future__ import annotations

import json
from typing import Any

from dsv4.chat.tokens import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    PARAMETER_END,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
    USER,
)

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")

MAX_EFFORT_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n"
)

TOOLS_HEADER = (
    "\n\n## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools "
    f'by writing a "{TOOL_CALLS_START}" block like the following:\n\n'
    f"{TOOL_CALLS_START}\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_END}\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"{TOOL_CALLS_END}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
    '`string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete "
    "reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_FOOTER = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n"
)


class ChatEncodingError(ValueError):
    """A conversation that cannot be rendered; the message names the message and the reason."""


def _text(content: Any, where: str) -> str:
    """Message content: a string, None, or a list of OpenAI text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ChatEncodingError(
                    f"{where}: only text content parts are supported, got {part!r:.80}"
                )
            if not isinstance(part.get("text"), str):
                raise ChatEncodingError(f"{where}: a text part needs a string 'text', got "
                                        f"{part!r:.80}")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatEncodingError(f"{where}: content must be a string or a list of text parts")


def _fits_markup(name: Any) -> bool:
    """A tool or parameter name is written into a DSML attribute: name="..."."""
    return isinstance(name, str) and bool(name) and not any(c in name for c in '"<>\n')


def _tool_schema(tool: Any, where: str) -> dict:
    """The `function` object of an OpenAI tool, validated."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or (tool.get("type", "function") != "function"):
        raise ChatEncodingError(
            f"{where}: a tool must be {{'type': 'function', 'function': {{...}}}}"
        )
    name = fn.get("name")
    if not _fits_markup(name):
        raise ChatEncodingError(
            f"{where}: tool name must be a non-empty string without quotes, "
            f"angle brackets or newlines, got {name!r}"
        )
    params = fn.get("parameters", {})
    if not isinstance(params, dict):
        raise ChatEncodingError(
            f"{where}: parameters of tool {name!r} must be a JSON-schema object"
        )
    return fn


def render_tool_calls(tool_calls: list[dict], where: str = "assistant message") -> str:
    """Assistant tool calls in DSML (string values as is, everything else as JSON)."""
    out = [f"\n\n{TOOL_CALLS_START}\n"]
    for i, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatEncodingError(f"{where}: tool_calls[{i}] needs function.name")
        if not _fits_markup(fn["name"]):
            raise ChatEncodingError(f"{where}: tool_calls[{i}].function.name must be a non-empty "
                                    f"name without quotes, angle brackets or newlines, got "
                                    f"{fn['name']!r:.80}")
        arguments = fn.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ChatEncodingError(
                    f"{where}: tool_calls[{i}].function.arguments is not valid JSON: {exc}"
                ) from exc
        if not isinstance(arguments, dict):
            raise ChatEncodingError(f"{where}: tool_calls[{i}] arguments must be a JSON object")
        bad = next((key for key in arguments if not _fits_markup(key)), None)
        if bad is not None:
            raise ChatEncodingError(f"{where}: tool_calls[{i}] has an argument named {bad!r:.80};"
                                    " argument names cannot hold quotes, angle brackets or "
                                    "newlines, or be empty")
        out.append(f'<{DSML}invoke name="{fn["name"]}">\n')
        for key, value in arguments.items():
            if isinstance(value, str):
                out.append(f'<{DSML}parameter name="{key}" string="true">{value}{PARAMETER_END}\n')
            else:
                text = json.dumps(value, ensure_ascii=False)
                out.append(f'<{DSML}parameter name="{key}" string="false">{text}{PARAMETER_END}\n')
        out.append(f"</{DSML}invoke>\n")
    out.append(TOOL_CALLS_END)
    return "".join(out)


def encode_messages(
    messages: list[dict],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> str:
    """The prompt text for `messages`, ending where the model starts its answer (or, when the
    last message is an assistant's, with that turn complete: how training renders it)."""
    if not isinstance(messages, list) or not messages:
        raise ChatEncodingError("messages must be a non-empty list")
    return _render(messages, thinking_mode, reasoning_effort, drop_thinking, add_default_bos_token)


def encode_continuation(
    messages: list[dict],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
) -> tuple[str, str]:
    """(prompt, start) for a conversation whose last message is an assistant turn the model
    is to continue (Anthropic's prefill, vLLM's continue_final_message): the prompt of every
    message before it, ending where the model starts its answer, and that turn's text so far
    as the model would have written it ("reasoning</think>content" in thinking mode, the
    content in chat mode). The turn has no EOS, so the model goes on from its last character."""
    if not isinstance(messages, list) or not messages:
        raise ChatEncodingError("messages must be a non-empty list")
    *before, last = messages
    where = f"messages[{len(messages) - 1}]"
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise ChatEncodingError(f"{where}: only an assistant message can be continued")
    if last.get("tool_calls"):
        raise ChatEncodingError(
            f"{where}: the last message is an assistant message with tool_calls; send each "
            "call's result (role 'tool') after it, or drop the calls to continue its text"
        )
    prompt = _render(before, thinking_mode, reasoning_effort, drop_thinking, True)
    content = _text(last.get("content"), where)
    if thinking_mode != "thinking":
        return prompt, content
    reasoning = _text(last.get("reasoning_content"), f"{where}.reasoning_content")
    return prompt, reasoning + (THINK_END + content if content else "")


def _render(
    messages: list[dict],
    thinking_mode: str,
    reasoning_effort: str | None,
    drop_thinking: bool,
    add_default_bos_token: bool,
) -> str:
    if thinking_mode not in THINKING_MODES:
        raise ChatEncodingError(
            f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}"
        )
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatEncodingError(
            f"reasoning_effort must be 'high', 'max' or None, got {reasoning_effort!r}"
        )
    thinking = thinking_mode == "thinking"

    system_parts: list[str] = []
    tools: list[dict] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ChatEncodingError(f"messages[{i}] must be an object with a 'role'")
        if msg["role"] in ("system", "developer"):
            system_parts.append(_text(msg.get("content"), f"messages[{i}]"))
            for j, tool in enumerate(msg.get("tools") or []):
                tools.append(_tool_schema(tool, f"messages[{i}].tools[{j}]"))
    has_tools = bool(tools)
    # Reasoning of earlier turns is dropped in thinking mode, unless tools are in play (an
    # agent loop needs the reasoning that led to each call) or the caller keeps it.
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    keep_reasoning_before = -1 if (drop_thinking and not has_tools) else len(messages)

    out = [BOS if add_default_bos_token else ""]
    if thinking and reasoning_effort == "max":
        out.append(MAX_EFFORT_PREAMBLE)
    out.append("\n\n".join(system_parts))
    if has_tools:
        out.append(TOOLS_HEADER)
        out.append("\n".join(json.dumps(fn, ensure_ascii=False) for fn in tools))
        out.append(TOOLS_FOOTER)

    pending_calls: list[str] = []  # ids of the last assistant's calls, in call order
    results: dict[str, str] = {}
    i = 0
    while i < len(messages):
        msg, where = messages[i], f"messages[{i}]"
        role = msg["role"]
        if role in ("system", "developer"):
            i += 1
        elif role == "user":
            out.append(USER + _text(msg.get("content"), where))
            i += 1
        elif role == "latest_reminder":
            out.append(LATEST_REMINDER + _text(msg.get("content"), where))
            i += 1
        elif role == "assistant":
            out.append(ASSISTANT)
            reasoning = msg.get("reasoning_content") or ""
            keep = thinking and (i > last_user or i < keep_reasoning_before)
            out.append(f"{THINK_START}{reasoning}{THINK_END}" if keep else THINK_END)
            out.append(_text(msg.get("content"), where))
            calls = msg.get("tool_calls") or []
            if calls:
                out.append(render_tool_calls(calls, where))
            out.append(EOS)
            pending_calls = [c.get("id", "") for c in calls]
            results = {}
            i += 1
        elif role == "tool":
            # a run of tool messages answers the previous assistant's calls; render the
            # results in call order as one user turn
            j = i
            while j < len(messages) and messages[j]["role"] == "tool":
                call_id = messages[j].get("tool_call_id")
                if call_id is None:
                    raise ChatEncodingError(f"messages[{j}]: a tool message needs tool_call_id, "
                                            "the id of the call it answers")
                if call_id not in pending_calls:
                    raise ChatEncodingError(
                        f"messages[{j}]: tool result for {call_id!r} has no matching call in "
                        f"the preceding assistant message (calls: {pending_calls})"
                    )
                if call_id in results:
                    raise ChatEncodingError(f"messages[{j}]: a second result for {call_id!r}")
                results[call_id] = _text(messages[j].get("content"), f"messages[{j}]")
                j += 1
            ordered = [results[c] for c in pending_calls if c in results]
            out.append(USER + "\n\n".join(f"<tool_result>{r}</tool_result>" for r in ordered))
            i = j
        else:
            raise ChatEncodingError(
                f"{where}: unknown role {role!r}; expected system, "
                "developer, user, assistant, tool or latest_reminder"
            )
    if not messages or messages[-1]["role"] != "assistant":
        out.append(ASSISTANT + (THINK_START if thinking else THINK_END))
    return "".join(out)
