"""Streaming parser of DeepSeek-V4 output: reasoning, content and DSML tool calls.

Feed it decoded text as it is generated; it returns typed events. It never emits any part of
markup (special tokens, DSML tags): characters that could still be the start of markup are
held back, and released as soon as they cannot. String argument values stream as they
arrive, JSON-escaped, so the concatenated argument fragments of a call are its JSON object.

It never raises on model output. A missing `</think>`, a broken or truncated DSML block, or an
end of text in the middle of a call all end in a `Finished` event with `malformed=True` and a
note; text that could not be parsed as markup is returned as content, and calls that did
parse are kept. `parse_completion` is this parser run over a whole text, so streaming and
one-shot parsing agree by construction.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from dsv4.chat.tokens import (
    DSML,
    EOS,
    INVOKE_END,
    PARAMETER_END,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
)


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallArgsDelta:
    index: int
    json_fragment: str


@dataclass
class ToolCallEnd:
    index: int


@dataclass
class Finished:
    malformed: bool = False
    notes: list[str] = field(default_factory=list)


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd | Finished

_INVOKE = re.compile(rf'<{DSML}invoke name="([^"<>\n]*)">')
_PARAM = re.compile(rf'<{DSML}parameter name="([^"<>\n]*)" string="(true|false)">')
_TOOL_BLOCK_START = f"\n\n{TOOL_CALLS_START}"
# Longest tag the structural states must see whole before deciding it is malformed.
_MAX_TAG = 200


def _new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class StreamParser:
    """`feed(text) -> events`, then `finish() -> events` (ends with `Finished`)."""

    def __init__(
        self,
        thinking_mode: str = "chat",
        id_factory: Callable[[], str] = _new_call_id,
        tool_names: set[str] | None = None,
    ):
        self.state = "reasoning" if thinking_mode == "thinking" else "content"
        self.id_factory = id_factory
        self.tool_names = tool_names
        self.buf = ""
        self.notes: list[str] = []
        self.num_calls = 0
        self.done = False
        self._param_string = True
        self._param_raw = ""  # non-string parameter value, emitted when it closes
        self._params_in_call = 0

    # ------------------------------------------------------------------ helpers

    def _note(self, text: str) -> None:
        self.notes.append(text)

    def _text_event(self, text: str) -> list[Event]:
        if not text:
            return []
        return [ReasoningDelta(text) if self.state == "reasoning" else ContentDelta(text)]

    def _args(self, fragment: str) -> list[Event]:
        return [ToolCallArgsDelta(self.num_calls - 1, fragment)] if fragment else []

    # ------------------------------------------------------------------ states

    def _step_text(self, final: bool) -> list[Event] | None:
        """reasoning / content: text up to the next marker."""
        markers = (EOS, _TOOL_BLOCK_START, TOOL_CALLS_START, THINK_END, THINK_START)
        hits = [(self.buf.find(m), -len(m), m) for m in markers if m in self.buf]
        if not hits:
            keep = 0 if final else _held_back(self.buf, markers)
            text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
            return self._text_event(text) or None
        pos, _, marker = min(hits)
        events = self._text_event(self.buf[:pos])
        self.buf = self.buf[pos + len(marker) :]
        if marker == EOS:
            self.done = True
        elif marker in (_TOOL_BLOCK_START, TOOL_CALLS_START):
            if self.state == "reasoning":
                self._note("tool calls began before </think>; reasoning closed there")
            self.state = "tools"
        elif marker == THINK_END:
            if self.state == "reasoning":
                self.state = "content"
            else:
                self._note("stray </think> in content was dropped")
        else:
            self._note(f"stray {marker} in {self.state} was dropped")
        return events

    def _step_tools(self, final: bool) -> list[Event] | None:
        """Between invokes: expect `<invoke name=...>` or `</tool_calls>`."""
        stripped = self.buf.lstrip()
        if not stripped:  # whitespace between tags: wait for the next tag
            return None
        m = _INVOKE.match(stripped)
        if m:
            self.buf = stripped[m.end() :]
            name = m.group(1)
            if self.tool_names is not None and name not in self.tool_names:
                self._note(f"call to unknown tool {name!r}")
            self.num_calls += 1
            self._params_in_call = 0
            self.state = "invoke"
            return [ToolCallStart(self.num_calls - 1, self.id_factory(), name), *self._args("{")]
        if stripped.startswith(TOOL_CALLS_END):
            self.buf = stripped[len(TOOL_CALLS_END) :]
            self.state = "after_tools"
            return []
        if self._could_still_match(stripped, [TOOL_CALLS_END, f'<{DSML}invoke name="'], final):
            return None
        return self._malformed("expected a DSML invoke or the end of the tool calls")

    def _step_invoke(self, final: bool) -> list[Event] | None:
        """Inside an invoke: expect `<parameter ...>` or `</invoke>`."""
        stripped = self.buf.lstrip()
        if not stripped:  # whitespace between tags: wait for the next tag
            return None
        m = _PARAM.match(stripped)
        if m:
            self.buf = stripped[m.end() :]
            key, self._param_string = m.group(1), m.group(2) == "true"
            sep = ", " if self._params_in_call else ""
            self._params_in_call += 1
            self.state = "param"
            self._param_raw = ""
            opening = json.dumps(key, ensure_ascii=False) + ": "
            return self._args(sep + opening + ('"' if self._param_string else ""))
        if stripped.startswith(INVOKE_END):
            self.buf = stripped[len(INVOKE_END) :]
            self.state = "tools"
            return [*self._args("}"), ToolCallEnd(self.num_calls - 1)]
        if self._could_still_match(stripped, [INVOKE_END, f'<{DSML}parameter name="'], final):
            return None
        return self._malformed("expected a DSML parameter or the end of the invoke")

    def _step_param(self, final: bool) -> list[Event] | None:
        """A parameter value up to `</parameter>`; strings stream, JSON values wait."""
        pos = self.buf.find(PARAMETER_END)
        if pos < 0:
            if final:
                return None
            if not self._param_string:
                return None  # wait for the whole JSON value
            keep = _held_back(self.buf, (PARAMETER_END, EOS))
            chunk, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
            return self._args(json.dumps(chunk, ensure_ascii=False)[1:-1]) or None
        value, self.buf = self.buf[:pos], self.buf[pos + len(PARAMETER_END) :]
        self.state = "invoke"
        if self._param_string:
            return self._args(json.dumps(value, ensure_ascii=False)[1:-1] + '"')
        try:
            text = json.dumps(json.loads(value), ensure_ascii=False)
        except json.JSONDecodeError:
            self._note(f"parameter value {value!r:.60} is not JSON; passed as a string")
            text = json.dumps(value, ensure_ascii=False)
        return self._args(text)

    def _step_after_tools(self, final: bool) -> list[Event] | None:
        stripped = self.buf.lstrip()
        if not stripped:  # whitespace between tags: wait for the next tag
            return None
        if stripped.startswith(EOS):
            self.buf = stripped[len(EOS) :]
            self.done = True
            return []
        if not final and EOS.startswith(stripped):
            return None
        self._note("text after the tool calls was kept as content")
        self.state = "content"
        self.buf = stripped
        return []

    def _could_still_match(self, text: str, prefixes: list[str], final: bool) -> bool:
        """True while `text` may still grow into one of the expected tags."""
        if final:
            return False
        for p in prefixes:
            if p.startswith(text) or (
                text.startswith(p) and len(text) < _MAX_TAG and ">" not in text[len(p) :]
            ):
                return True
        return False

    def _malformed(self, why: str) -> list[Event]:
        """Markup that cannot be parsed: close what is open, keep the raw text as content."""
        self._note(f"malformed DSML ({why}); the rest is returned as content")
        events = self._close_open_call()
        self.state = "content"
        return events

    def _close_open_call(self) -> list[Event]:
        events: list[Event] = []
        if self.state == "param":
            if self._param_string:
                events += self._args(json.dumps(self.buf, ensure_ascii=False)[1:-1] + '"')
            else:
                events += self._args(json.dumps(self.buf.strip(), ensure_ascii=False))
            self.buf = ""
            self.state = "invoke"
        if self.state == "invoke":
            events += [*self._args("}"), ToolCallEnd(self.num_calls - 1)]
        return events

    # ------------------------------------------------------------------ public

    _STEPS = {
        "reasoning": _step_text,
        "content": _step_text,
        "tools": _step_tools,
        "invoke": _step_invoke,
        "param": _step_param,
        "after_tools": _step_after_tools,
    }

    def _run(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self.buf and not self.done:
            produced = self._STEPS[self.state](self, final)
            if produced is None:
                break
            events += produced
        return events

    def feed(self, text: str) -> list[Event]:
        if self.done:
            if text:
                self.buf += text  # text after EOS is kept, and returned at finish
            return []
        self.buf += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        events = self._run(final=True)
        if self.state == "reasoning":
            self._note("the reasoning never closed with </think>")
        if self.state in ("param", "invoke"):
            self._note("the text ended inside a tool call; it was closed")
            events += self._close_open_call()
        elif self.state in ("tools", "after_tools") and not self.done:
            if self.state == "tools":
                self._note("the tool-call block was not closed")
        if self.state in ("tools", "after_tools") and not self.buf.strip():
            self.buf = ""  # whitespace after the last tag
        if self.buf:  # whatever remains (after EOS, or unparseable) is content
            events.append(ContentDelta(self.buf))
            self.buf = ""
        self.done = True
        malformed = any(not n.startswith("call to unknown tool") for n in self.notes)
        events.append(Finished(malformed, list(self.notes)))
        return events


def collect(events: list[Event]) -> dict:
    """Fold events into an OpenAI assistant message."""
    content, reasoning = [], []
    calls: list[dict] = []
    for e in events:
        if isinstance(e, ContentDelta):
            content.append(e.text)
        elif isinstance(e, ReasoningDelta):
            reasoning.append(e.text)
        elif isinstance(e, ToolCallStart):
            calls.append(
                {"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}}
            )
        elif isinstance(e, ToolCallArgsDelta):
            calls[e.index]["function"]["arguments"] += e.json_fragment
    return {
        "role": "assistant",
        "content": "".join(content),
        "reasoning_content": "".join(reasoning),
        "tool_calls": calls,
    }


def parse_completion(text: str, thinking_mode: str = "chat", **parser_kwargs) -> dict:
    """One-shot parse of a whole completion: {"role", "content", "reasoning_content",
    "tool_calls", "malformed", "notes"}."""
    parser = StreamParser(thinking_mode, **parser_kwargs)
    events = parser.feed(text) + parser.finish()
    message = collect(events)
    finished = events[-1]
    message["malformed"], message["notes"] = finished.malformed, finished.notes
    return message
