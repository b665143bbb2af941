"""The encoder against the official reference encoder's golden vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.chat import ChatEncodingError, encode_continuation, encode_messages
from dsv4.chat.tokens import EOS

CASES = json.loads((Path(__file__).parent / "data" / "chat_encoding.json").read_text())["cases"]
ENCODE = [c for c in CASES if c["kind"] == "encode"]


@pytest.mark.parametrize("case", ENCODE, ids=[c["name"] for c in ENCODE])
def test_golden_prompt_byte_for_byte(case):
    assert encode_messages(case["messages"], **case["options"]) == case["expected_prompt"]


def test_conversation_ending_with_assistant_renders_its_turn_for_training():
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
    ]
    assert encode_messages(msgs, "thinking").endswith(
        "<｜User｜>Hi<｜Assistant｜><think>greet</think>Hello!<｜end▁of▁sentence｜>"
    )
    assert encode_messages(msgs, "chat").endswith(
        "<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>"
    )


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_a_continued_turn_is_the_complete_turn_without_its_eos(mode):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
    ]
    prompt, start = encode_continuation(msgs, mode)
    assert prompt == encode_messages(msgs[:-1], mode)  # ends where the model starts its answer
    assert prompt + start + EOS == encode_messages(msgs, mode)
    assert start == ("greet</think>Hello" if mode == "thinking" else "Hello")
    # reasoning only: the model goes on thinking
    assert encode_continuation(msgs[:-1] + [{"role": "assistant", "content": None,
                                             "reasoning_content": "hm"}], "thinking")[1] == "hm"
    # nothing before the turn but the BOS
    alone = encode_continuation([{"role": "assistant", "content": "Once"}], mode)
    assert alone[0] == "<｜begin▁of▁sentence｜><｜Assistant｜>" + (
        "<think>" if mode == "thinking" else "</think>")


def test_only_an_assistant_turn_without_calls_can_be_continued():
    with pytest.raises(ChatEncodingError, match=r"messages\[0\]: only an assistant message"):
        encode_continuation([{"role": "user", "content": "x"}])
    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(ChatEncodingError, match=r"messages\[1\]: .*with tool_calls; send"):
        encode_continuation([{"role": "user", "content": "x"},
                             {"role": "assistant", "content": "", "tool_calls": [call]}])


def test_developer_role_and_text_parts():
    msgs = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert (
        encode_messages(msgs)
        == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>ab<｜Assistant｜></think>"
    )
    assert not encode_messages(msgs, add_default_bos_token=False).startswith("<｜begin")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "wizard", "content": "x"}], r"messages\[0\]: unknown role 'wizard'"),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "zzz", "content": "1"},
            ],
            r"messages\[2\]: tool result for 'zzz' has no matching call",
        ),
        (
            [
                {
                    "role": "system",
                    "content": "s",
                    "tools": [{"type": "function", "function": {"name": ""}}],
                },
                {"role": "user", "content": "x"},
            ],
            r"messages\[0\]\.tools\[0\]: tool name",
        ),
        (
            [
                {
                    "role": "system",
                    "content": "s",
                    "tools": [
                        {"type": "function", "function": {"name": "f", "parameters": "nope"}}
                    ],
                },
                {"role": "user", "content": "x"},
            ],
            r"messages\[0\]\.tools\[0\]: parameters of tool 'f'",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{bad"},
                        }
                    ],
                },
            ],
            r"messages\[1\]: tool_calls\[0\]\.function\.arguments is not valid JSON",
        ),
        ([{"role": "user", "content": {"image": 1}}], r"messages\[0\]: content must be"),
        ([{"role": "user", "content": [{"type": "text"}]}],
         r"messages\[0\]: a text part needs a string 'text'"),
        ([{"role": "user", "content": "x"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {
              "name": 'a"><x', "arguments": {}}}]}],
         r"messages\[1\]: tool_calls\[0\]\.function\.name must be"),
        ([{"role": "user", "content": "x"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {
              "name": "f", "arguments": {'k"': 1}}}]}],
         r"messages\[1\]: tool_calls\[0\] has an argument named 'k\"'"),
        ([{"role": "user", "content": "x"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {
              "name": "f", "arguments": {}}}]},
          {"role": "tool", "content": "1"}],
         r"messages\[2\]: a tool message needs tool_call_id"),
        ([], "non-empty"),
    ],
)
def test_unencodable_input_names_the_message_and_the_reason(messages, match):
    with pytest.raises(ChatEncodingError, match=match):
        encode_messages(messages)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([{"role": "user", "content": "x"}], thinking_mode="deep")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages([{"role": "user", "content": "x"}], reasoning_effort="low")
