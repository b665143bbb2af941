"""The streaming parser: golden completions, any split into deltas, no markup leaks, leniency."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.chat import (
    ContentDelta,
    Finished,
    ReasoningDelta,
    StreamParser,
    ToolCallArgsDelta,
    ToolCallStart,
    collect,
    parse_completion,
)
from dsv4.chat.encoder import render_tool_calls

CASES = json.loads((Path(__file__).parent / "data" / "chat_encoding.json").read_text())["cases"]
PARSE = [c for c in CASES if c["kind"] == "parse"]
# Anything that is (part of) markup must never reach content, reasoning or arguments.
LEAKS = ("｜DSML｜", "<｜", "｜>", "<think>", "</think>", "invoke name", "parameter name")


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def stream(text: str, pieces: list[str] | None, mode: str):
    parser = StreamParser(mode, id_factory=_ids())
    events = []
    for piece in pieces if pieces is not None else [text]:
        events += parser.feed(piece)
    return events + parser.finish()


def split_at(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def message(events):
    msg = collect(events)
    for call in msg["tool_calls"]:
        del call["id"]
    return msg


def assert_no_markup(events):
    for e in events:
        text = getattr(e, "text", None) or getattr(e, "json_fragment", None) or ""
        for leak in LEAKS:
            assert leak not in text, (leak, e)


@pytest.mark.parametrize(
    "case", [c for c in PARSE if "expected_message" in c], ids=lambda c: c["name"]
)
def test_golden_completions_parse_to_the_expected_message(case):
    got = parse_completion(case["completion"], case["options"]["thinking_mode"])
    assert not got["malformed"]
    expected = case["expected_message"]
    assert got["content"] == expected["content"]
    assert got["reasoning_content"] == expected["reasoning_content"]
    assert [{"type": c["type"], "function": c["function"]} for c in got["tool_calls"]] == expected[
        "tool_calls"
    ]


def test_the_completion_the_reference_rejects_is_kept_leniently():
    case = next(c for c in PARSE if c.get("expected_error"))
    got = parse_completion(case["completion"], case["options"]["thinking_mode"])
    assert got["malformed"] and "never closed" in got["notes"][0]
    assert got["reasoning_content"] == "I am thinking but never close"  # nothing lost
    assert got["tool_calls"] == []


@pytest.mark.parametrize("case", PARSE, ids=lambda c: c["name"])
def test_streaming_char_by_char_and_random_splits_match_one_shot(case):
    text, mode = case["completion"], case["options"]["thinking_mode"]
    whole = message(stream(text, None, mode))
    by_char = stream(text, list(text), mode)
    assert message(by_char) == whole
    assert_no_markup(by_char)
    rng = random.Random(0)
    for _ in range(50):
        events = stream(
            text, split_at(text, [rng.randrange(len(text) + 1) for _ in range(8)]), mode
        )
        assert message(events) == whole
        assert_no_markup(events)


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(PARSE), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_gives_the_same_message(case, cuts):
    text, mode = case["completion"], case["options"]["thinking_mode"]
    events = stream(text, split_at(text, cuts), mode)
    assert message(events) == message(stream(text, None, mode))
    assert_no_markup(events)
    # argument fragments concatenate to JSON equal to the final arguments
    for call in collect(events)["tool_calls"]:
        json.loads(call["function"]["arguments"])


def test_long_string_argument_streams_before_the_parameter_closes():
    value = "".join(random.Random(1).choice('abc xyz\n"\\é') for _ in range(2000))
    text = (
        "</think>"
        + render_tool_calls(
            [{"function": {"name": "write", "arguments": json.dumps({"body": value})}}]
        )
        + "<｜end▁of▁sentence｜>"
    )
    parser = StreamParser("chat", id_factory=_ids())
    close = text.index("</｜DSML｜parameter>")
    early = []
    for i in range(0, close, 7):  # deltas of 7 characters, up to just before the close tag
        early += parser.feed(text[i : min(i + 7, close)])
    fragments = [e.json_fragment for e in early if isinstance(e, ToolCallArgsDelta)]
    assert len(fragments) > 100  # streamed as it arrived, not held until the close
    streamed = "".join(fragments)
    assert streamed.startswith('{"body": "') and len(streamed) > 2000
    events = early + parser.feed(text[close:]) + parser.finish()
    args = collect(events)["tool_calls"][0]["function"]["arguments"]
    assert json.loads(args) == {"body": value}


def test_markup_split_at_every_point_is_held_then_released():
    parser = StreamParser("chat")
    assert parser.feed("Hello <") == [ContentDelta("Hello ")]
    assert parser.feed("｜DS") == []  # could still be DSML
    assert parser.feed("x") == [ContentDelta("<｜DSx")]  # no longer can: released at once
    assert parser.feed("\n") == []
    assert parser.feed("\nok") == [ContentDelta("\n\nok")]


@pytest.mark.parametrize(
    "text, mode, check",
    [
        # tool call with no </think>: the call still parses (reasoning closes there)
        (
            'thinking...\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter '
            'name="a" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
            "thinking",
            lambda m: (
                m["reasoning_content"] == "thinking..."
                and json.loads(m["tool_calls"][0]["function"]["arguments"]) == {"a": 1}
            ),
        ),
        # EOS in the middle of a string argument: the call is closed and kept, flagged
        (
            '</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter '
            'name="a" string="true">partial va',
            "chat",
            lambda m: (
                json.loads(m["tool_calls"][0]["function"]["arguments"]) == {"a": "partial va"}
            ),
        ),
        # garbage inside the block: the first call is kept, the rest comes back as content
        (
            'ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n<oops>tail',
            "chat",
            lambda m: (
                m["tool_calls"][0]["function"]["arguments"] == "{}"
                and m["content"] == "ok\n<oops>tail"
            ),
        ),
        # a non-JSON value for string="false" becomes a string, nothing lost
        (
            '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="n" '
            'string="false">not json</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
            "chat",
            lambda m: json.loads(m["tool_calls"][0]["function"]["arguments"]) == {"n": "not json"},
        ),
    ],
)
def test_lenient_on_broken_output(text, mode, check):
    for pieces in (None, list(text)):
        events = stream(text, pieces, mode)
        msg = collect(events)
        assert check(msg), msg
        assert isinstance(events[-1], Finished) and events[-1].malformed
        assert_no_markup(events)


def test_unknown_tool_is_noted_but_kept():
    text = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="nope">\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>"
    )
    parser = StreamParser("chat", tool_names={"f"})
    events = parser.feed(text) + parser.finish()
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["nope"]
    assert not events[-1].malformed and "unknown tool" in events[-1].notes[0]


def test_reasoning_then_content_events_are_typed():
    events = stream("a</think>b", None, "thinking")
    assert [type(e) for e in events] == [ReasoningDelta, ContentDelta, Finished]


def test_streaming_one_token_at_a_time_matches_one_shot():
    """Deltas cut where a byte-level BPE trained on the completions cuts them (special tokens
    and DSML markers are single tokens, as in the released tokenizer)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from dsv4.chat.tokens import SPECIAL_TOKENS

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [c["completion"] for c in PARSE],
        trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL_TOKENS,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for case in PARSE:
        text, mode = case["completion"], case["options"]["thinking_mode"]
        ids = bpe.encode(text).ids
        assert len(ids) > 5
        pieces = [bpe.decode([i], skip_special_tokens=False) for i in ids]
        assert "".join(pieces) == text
        events = stream(text, pieces, mode)
        assert message(events) == message(stream(text, None, mode))
        assert_no_markup(events)
