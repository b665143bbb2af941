"""Incremental detokenisation for streaming text and stop strings.

Works against the smallest tokenizer protocol, `decode(ids, skip_special_tokens=...) -> str`,
so that any tokenizer wrapper (ours in `dsv4.chat`, `tokenizers`, `transformers`) fits.

Why incremental: decoding token by token breaks multi-byte characters split across tokens
(byte-level BPE yields U+FFFD for a partial UTF-8 sequence) and drops leading spaces in
SentencePiece-style decoders. So each step decodes a short run of recent tokens twice, with and
without the new ones, and emits the difference; while the tail is an incomplete character
(ends in U+FFFD) nothing is emitted and the tokens are kept for the next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens used as left context so the first output token decodes as it would mid-text.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, and finds stop strings in it."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the decoded context run
        self._read_offset = len(self._ids)  # tokens before this are already emitted
        self.output_text = ""
        self._checked_len = 0  # output_text[:this] has been searched for stop strings
        self._stop_floor = 0  # stop strings must start here or later (after min_tokens text)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is partial)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) < len(prefix):
            return ""
        new_text = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.output_text += new_text
        return new_text

    def flush(self) -> str:
        """At the end of a request: emit whatever is pending, even an incomplete character."""
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.output_text += new_text
        return new_text

    def find_stop(self, stop: list[str], include_stop_str: bool,
                  kept: Sequence[str] = ()) -> str | None:
        """Search the text added since the last call (plus overlap) for a stop string, one of
        `stop` or of `kept`.

        On a hit, cut `output_text` at the stop string (keeping it if `include_stop_str` or it
        is one of `kept`) and return the string. The overlap of len(longest stop) - 1
        characters catches stop strings split across tokens.
        """
        strings = [*stop, *kept]
        longest = max((len(s) for s in strings), default=0)
        start = max(self._stop_floor, self._checked_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in strings:
            i = self.output_text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        self._checked_len = len(self.output_text)
        if best is None:
            return None
        i, s = best
        keep = include_stop_str or s in kept  # a string in both lists is kept
        self.output_text = self.output_text[: i + len(s) if keep else i]
        return s

    def skip_stop_check(self) -> None:
        """Text produced before min_tokens is reached may not end the request."""
        self._checked_len = self._stop_floor = len(self.output_text)

    def safe_text_len(self, stop: list[str], finished: bool) -> int:
        """How much of output_text may be streamed now: a possible stop-string prefix at the
        end is held back until it is confirmed or ruled out."""
        if finished or not stop:
            return len(self.output_text)
        return max(0, len(self.output_text) - (max(len(s) for s in stop) - 1))
