"""DeepSeek-V4's chat protocol: prompt encoder, streaming output parser, tokenizer.
Pure Python; depends on nothing else in dsv4 and on no model."""

from __future__ import annotations

from dsv4.chat.detokenizer import IncrementalDetokenizer
from dsv4.chat.encoder import (
    ChatEncodingError,
    encode_continuation,
    encode_messages,
    render_tool_calls,
)
from dsv4.chat.parser import (
    ContentDelta,
    Finished,
    ReasoningDelta,
    StreamParser,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    collect,
    parse_completion,
)
from dsv4.chat.tokenizer import Tokenizer

__all__ = [
    "ChatEncodingError",
    "ContentDelta",
    "Finished",
    "IncrementalDetokenizer",
    "ReasoningDelta",
    "StreamParser",
    "Tokenizer",
    "ToolCallArgsDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "collect",
    "encode_continuation",
    "encode_messages",
    "parse_completion",
    "render_tool_calls",
]
