"""`dsv4 serve` end to end: real uvicorn subprocesses on 127.0.0.1, the official `openai` and
`anthropic` clients, a tiny V4 model (the bundled dsv4-tiny when present, else a random one
with a trained BPE tokenizer). A random model writes nonsense, so tests check structure,
counts and equalities (streamed == not streamed, usage == tokenizer), never wording.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_harness import BUNDLED, ServerProcess, build_tiny_model  # noqa: E402

from dsv4.chat import Tokenizer, encode_messages  # noqa: E402
from dsv4.train.data import TOOLS  # noqa: E402

KEY = "test-key"
# DSV4_FUZZ_EXAMPLES=5000 DSV4_FUZZ_RANDOM=1 for a longer, non-reproducible search
FUZZ_EXAMPLES = int(os.environ.get("DSV4_FUZZ_EXAMPLES", "400"))
DERANDOMIZE = not os.environ.get("DSV4_FUZZ_RANDOM")
MODEL = "dsv4-test"
WEATHER = [{"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "What is the weather in Paris?"}]
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if (BUNDLED / "config.json").is_file():
        return BUNDLED
    return build_tiny_model(tmp_path_factory.mktemp("tiny-v4"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_folder(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    proc = ServerProcess(model_dir, "--max-num-seqs", "64", "--max-num-batched-tokens", "4096",
                         api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def small_server(model_dir):
    """Two running sequences, one queued, a 1024-token context, bodies up to 100 kB: fills up
    and ends quickly."""
    proc = ServerProcess(model_dir, "--max-num-seqs", "2", "--max-queue", "1",
                         "--max-model-len", "1024", "--max-request-bytes", "100000")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _prompt_tokens(tokenizer, messages, mode, tools=None) -> int:
    messages = [dict(m) for m in messages]
    if tools:
        messages[0] = {**messages[0], "tools": tools}
    return len(tokenizer.encode(encode_messages(messages, mode)))


def _stream_chat(client, **kwargs) -> dict:
    """Fold a streamed chat completion into {content, reasoning, tool_calls, tokens,
    finish_reason, usage} (choice 0)."""
    out = {"content": "", "reasoning": "", "tool_calls": {}, "tokens": [], "finish": None,
           "usage": None, "roles": 0}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            out["roles"] += d.role == "assistant"
            out["content"] += d.content or ""
            out["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for call in d.tool_calls or []:
                slot = out["tool_calls"].setdefault(call.index, {"name": "", "arguments": ""})
                if call.function and call.function.name:
                    slot["name"] = call.function.name
                if call.function and call.function.arguments:
                    slot["arguments"] += call.function.arguments
            if choice.logprobs and choice.logprobs.content:
                out["tokens"] += [t.token for t in choice.logprobs.content]
            if choice.finish_reason:
                out["finish"] = choice.finish_reason
    return out


# --------------------------------------------------------------------------- OpenAI chat


def test_health_models_and_auth(server):
    assert server.health()["status"] == "ok"
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in ok.models.list().data] == [MODEL]
    assert ok.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        ok.models.retrieve("gpt-4")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY})
    assert r.status_code == 200
    r = httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY,
                                                     "Authorization": "Bearer other"})
    assert r.status_code == 200  # either header may carry the key
    r = httpx.post(server.url + "/v1/messages", json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_chat_plain_and_streamed(client, tokenizer, mode):
    kwargs = dict(model=MODEL, messages=WEATHER, max_tokens=12, temperature=0, logprobs=True,
                  extra_body={"thinking": {"type": "enabled" if mode == "thinking" else
                                           "disabled"}})
    plain = client.chat.completions.create(**kwargs)
    choice = plain.choices[0]
    streamed = _stream_chat(client, stream_options={"include_usage": True}, **kwargs)
    assert streamed["roles"] == 1
    assert streamed["content"] == (choice.message.content or "")
    assert streamed["reasoning"] == (getattr(choice.message, "reasoning_content", None) or "")
    assert streamed["tokens"] == [t.token for t in choice.logprobs.content]
    assert streamed["finish"] == choice.finish_reason in ("stop", "length", "tool_calls")
    usage = plain.usage
    assert usage.prompt_tokens == _prompt_tokens(tokenizer, WEATHER, mode)
    assert usage.completion_tokens == len(choice.logprobs.content) <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert streamed["usage"].model_dump() == usage.model_dump()
    reasoning = usage.completion_tokens_details.reasoning_tokens
    if mode == "chat":
        assert reasoning == 0 and not getattr(choice.message, "reasoning_content", None)
    else:
        assert 0 <= reasoning <= usage.completion_tokens
        assert isinstance(choice.message.reasoning_content, str)


def test_length_usage_and_stop(client, tokenizer):
    out = client.chat.completions.create(
        model=MODEL, messages=WEATHER, max_completion_tokens=9, seed=3,
        extra_body={"ignore_eos": True, "thinking": {"type": "disabled"}})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 9
    text = out.choices[0].message.content
    # stop on a piece of what this seed writes: generation ends before it, reason "stop"
    piece = next((text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip()), None)
    if piece:
        stopped = client.chat.completions.create(
            model=MODEL, messages=WEATHER, max_completion_tokens=9, seed=3, stop=[piece],
            extra_body={"ignore_eos": True, "thinking": {"type": "disabled"}})
        assert stopped.choices[0].finish_reason == "stop"
        assert piece not in stopped.choices[0].message.content
        assert text.startswith(stopped.choices[0].message.content)


def test_n2_and_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL, messages=WEATHER, max_tokens=6, n=2, seed=11, temperature=1.0,
        logprobs=True, top_logprobs=3, presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9)
    assert [c.index for c in out.choices] == [0, 1]
    total = 0
    for c in out.choices:
        assert c.finish_reason in ("stop", "length")
        for tok in c.logprobs.content:
            assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
            assert tok.top_logprobs[0].logprob >= tok.top_logprobs[-1].logprob
        total += len(c.logprobs.content)
    assert out.usage.completion_tokens == total
    again = client.chat.completions.create(
        model=MODEL, messages=WEATHER, max_tokens=6, n=2, seed=11, temperature=1.0,
        logprobs=True, top_logprobs=3, presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_tool_round_trip(client, tokenizer):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=forced, max_tokens=64,
                  temperature=0, extra_body={"thinking": {"type": "disabled"}})
    first = client.chat.completions.create(**kwargs)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)
    assert "DSML" not in (choice.message.content or "") + call.function.arguments
    # the call ends at its closing tag, whatever min_tokens asks for
    padded = client.chat.completions.create(
        **{**kwargs, "extra_body": {**kwargs["extra_body"], "min_tokens": 40}})
    assert padded.usage.completion_tokens == first.usage.completion_tokens
    assert padded.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    streamed = _stream_chat(client, **kwargs)
    assert streamed["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed["tool_calls"].values()] == \
        [("get_weather", call.function.arguments)]

    result = {"city": "Paris", "temperature": 18, "unit": "celsius", "condition": "sunny"}
    history = WEATHER + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                           max_tokens=12, temperature=0,
                                           extra_body={"thinking": {"type": "disabled"}})
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    rendered = [{**WEATHER[0], "tools": TOOLS}, WEATHER[1],
                {"role": "assistant", "content": choice.message.content or "",
                 "tool_calls": [{"id": call.id, "type": "function",
                                 "function": {"name": "get_weather",
                                              "arguments": call.function.arguments}}]},
                history[-1]]
    assert final.usage.prompt_tokens == len(tokenizer.encode(encode_messages(rendered, "chat")))


def test_tool_choice_required_and_none(client, tokenizer):
    required = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS[:1], tool_choice="required", max_tokens=64,
        temperature=0, extra_body={"thinking": {"type": "disabled"}})
    assert required.choices[0].finish_reason == "tool_calls"
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"
    thinking = client.chat.completions.create(  # forced calls close the (empty) reasoning
        model=MODEL, messages=WEATHER, tools=TOOLS, max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "calculator"}})
    assert thinking.choices[0].message.tool_calls[0].function.name == "calculator"
    assert thinking.usage.completion_tokens_details.reasoning_tokens == 0
    none = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="none", max_tokens=1,
        extra_body={"thinking": {"type": "disabled"}})
    assert none.usage.prompt_tokens == _prompt_tokens(tokenizer, WEATHER, "chat")
    auto = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, max_tokens=1,
        extra_body={"thinking": {"type": "disabled"}})
    assert auto.usage.prompt_tokens == _prompt_tokens(tokenizer, WEATHER, "chat", TOOLS)


def test_thinking_controls(client, tokenizer):
    """reasoning_effort max adds V4's preamble; chat_template_kwargs switches the mode."""
    def prompt_tokens(**kw):
        return client.chat.completions.create(model=MODEL, messages=WEATHER, max_tokens=1,
                                              **kw).usage.prompt_tokens

    assert prompt_tokens(reasoning_effort="max") == len(tokenizer.encode(
        encode_messages(WEATHER, "thinking", reasoning_effort="max")))
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"thinking": False}}) == \
        _prompt_tokens(tokenizer, WEATHER, "chat")
    assert prompt_tokens() == _prompt_tokens(tokenizer, WEATHER, "thinking")  # DeepSeek default


# --------------------------------------------------------------------------- completions


def test_completions(client, tokenizer):
    kw = dict(model=MODEL, max_tokens=6, temperature=0, logprobs=2)
    one = client.completions.create(prompt="The weather in Paris is", **kw)
    assert len(one.choices) == 1 and one.choices[0].finish_reason in ("stop", "length")
    assert one.usage.prompt_tokens == len(tokenizer.encode(
        "<｜begin▁of▁sentence｜>The weather in Paris is"))
    assert one.usage.completion_tokens == len(one.choices[0].logprobs.tokens)
    ids = tokenizer.encode("<｜begin▁of▁sentence｜>The weather in Paris is")
    by_ids = client.completions.create(prompt=ids, **kw)
    assert by_ids.choices[0].text == one.choices[0].text
    many = client.completions.create(prompt=["Hello", "The weather in Paris is"], n=2, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[2].text == one.choices[0].text
    text = "".join(c.choices[0].text for c in client.completions.create(
        prompt="The weather in Paris is", stream=True, **kw))
    assert text == one.choices[0].text
    echo = client.completions.create(prompt="Hello", model=MODEL, max_tokens=3, echo=True,
                                     temperature=0)
    assert echo.choices[0].text.startswith("<｜begin▁of▁sentence｜>Hello")


# --------------------------------------------------------------------------- Anthropic


def test_anthropic_streamed_tool_round_trip(server):
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.messages.stream(model=MODEL, max_tokens=64, messages=messages,
                                system=[{"type": "text", "text": "You are helpful."}],
                                tools=ANTHROPIC_TOOLS, extra_body={"temperature": 0},
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict)
    assert use.id.startswith("toolu_")
    count = client.messages.count_tokens(model=MODEL, messages=messages,
                                         system=[{"type": "text", "text": "You are helpful."}],
                                         tools=ANTHROPIC_TOOLS,
                                         tool_choice={"type": "tool", "name": "get_weather"})
    assert message.usage.input_tokens == count.input_tokens

    history = messages + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in
                                          message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": '{"temperature": 18, "unit": "celsius"}'}]},
    ]
    final = client.messages.create(model=MODEL, max_tokens=10, messages=history,
                                   tools=ANTHROPIC_TOOLS, extra_body={"temperature": 0})
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert final.usage.output_tokens <= 10 and final.usage.input_tokens > count.input_tokens
    # stop_sequences: generation ends before a piece of what it wrote without them
    free = client.messages.create(model=MODEL, max_tokens=8, messages=messages,
                                  extra_body={"temperature": 0})
    text = "".join(b.text for b in free.content if b.type == "text")
    piece = next((text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip()),
                 None)
    if piece:
        cut = client.messages.create(model=MODEL, max_tokens=8, messages=messages,
                                     stop_sequences=[piece], extra_body={"temperature": 0})
        assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", piece)
    thinking = client.messages.create(model=MODEL, max_tokens=8, messages=messages,
                                      thinking={"type": "enabled", "budget_tokens": 1024})
    assert thinking.content and {b.type for b in thinking.content} <= {"thinking", "text",
                                                                        "tool_use"}


def _before_a_word(text: str, words: int) -> str:
    """`text` up to the space before its `words`-th word: a boundary the byte-level BPE also
    splits at, so the model sees the same tokens as when it wrote `text` itself."""
    cuts = [i for i, ch in enumerate(text) if ch == " "]
    return text[:cuts[min(words, len(cuts)) - 1]] if cuts else ""


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_a_final_assistant_message_is_continued_not_sent_back(server, client, mode):
    """Anthropic's prefill (and vLLM's continue_final_message): the model goes on from the
    client's start of its answer, and only what it adds comes back."""
    ask = "What is 35 - 17?" if mode == "thinking" else "What can you do?"
    question = [{"role": "user", "content": ask}]
    kwargs = dict(model=MODEL, max_tokens=80, temperature=0,
                  extra_body={"thinking": {"type": "enabled" if mode == "thinking" else
                                           "disabled"}})
    whole = client.chat.completions.create(messages=question, **kwargs).choices[0].message
    field = "reasoning_content" if mode == "thinking" else "content"
    text = getattr(whole, field)
    start = _before_a_word(text, 3)
    assert start, text
    rest = client.chat.completions.create(
        messages=question + [{"role": "assistant", "content": None, field: start}], **kwargs
    ).choices[0].message
    assert start + getattr(rest, field) == text
    if mode == "thinking":
        assert rest.content == whole.content
    else:  # the same through the Anthropic client
        claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
        out = claude.messages.create(model=MODEL, max_tokens=80, extra_body={"temperature": 0},
                                     messages=question + [{"role": "assistant",
                                                           "content": start}])
        assert start + "".join(b.text for b in out.content if b.type == "text") == text


# --------------------------------------------------------------------------- load


def test_64_concurrent_streams_lose_and_duplicate_nothing(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                                    timeout=120)

        def kwargs(i):
            mode = "enabled" if i % 2 else "disabled"
            return dict(model=MODEL, max_tokens=12, seed=i, temperature=1.0, logprobs=True,
                        messages=[{"role": "user", "content": f"Question {i}: what is {i} + 1?"}],
                        extra_body={"thinking": {"type": mode}})

        async def streamed(i):
            content, reasoning, tokens, finish = "", "", [], None
            async for chunk in await client.chat.completions.create(stream=True, **kwargs(i)):
                for c in chunk.choices:
                    content += c.delta.content or ""
                    reasoning += getattr(c.delta, "reasoning_content", None) or ""
                    tokens += [t.token for t in (c.logprobs.content if c.logprobs else [])]
                    finish = c.finish_reason or finish
            return content, reasoning, tokens, finish

        streams = await asyncio.gather(*(streamed(i) for i in range(64)))
        plains = await asyncio.gather(
            *(client.chat.completions.create(**kwargs(i)) for i in range(64)))
        await client.close()
        return streams, plains

    streams, plains = asyncio.run(main())
    distinct = set()
    for (content, reasoning, tokens, finish), out in zip(streams, plains):
        c = out.choices[0]
        assert finish == c.finish_reason is not None
        assert tokens == [t.token for t in c.logprobs.content]  # none lost, none repeated
        assert len(tokens) == out.usage.completion_tokens
        assert content == (c.message.content or "")
        assert reasoning == (getattr(c.message, "reasoning_content", None) or "")
        distinct.add(tuple(tokens))
    assert len(distinct) > 32  # the seeds differ, so the samples do


# --------------------------------------------------------------------------- errors


def _post(server, path, body, **kw):
    headers = {**server.headers(), **kw.pop("headers", {})}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, timeout=60,
                          headers={**headers, "content-type": "application/json"})
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


CHAT_ERRORS = [
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ({"max_tokens": 10**7}, 400, "max_tokens"),
    ({"model": "gpt-5"}, 404, "model"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "nope"}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400,
     "messages[1]"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": 7}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"n": 0}, 400, "n"),
    ({"seed": 2**70}, 400, "seed"),
    ({"stop": [""]}, 400, "stop"),
    ({"stop": ["a"] * 17}, 400, "stop"),  # too many, not "should be a valid string"
    ({"tools": TOOLS, "tool_choice": "always"}, 400, "tool_choice"),  # no union member's name
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": 'f"><x', "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "1"}]}, 400,
     "messages[1].tool_calls[0].function.name"),  # would be written into the DSML markup
    ({"top_logprobs": 30, "logprobs": True}, 400, "top_logprobs"),
    ({"logit_bias": {"5": 3.0}}, 400, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": 12}}}}}]}, 400,
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400,
     "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     "tool_choice"),
    ({"thinking": {"type": "sometimes"}}, 400, "thinking.type"),
    ({"chat_template_kwargs": {"thinking": "yes"}}, 400, "chat_template_kwargs.thinking"),
    ({"stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize("change,status,param", CHAT_ERRORS)
def test_chat_errors_name_the_field(server, change, status, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **change}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] and param.split("[")[0] in error["message"]


def test_other_errors(server, client):
    r = _post(server, "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = _post(server, "/v1/chat/completions", [1, 2, 3])
    assert r.status_code == 400 and "object" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "weather " * 70000}])
    assert exc.value.body["param"] == "messages"
    assert exc.value.body["code"] == "context_length_exceeded"
    r = _post(server, "/v1/chat/completions",
              b'{"model": "dsv4-test", "messages": [{"role": "user", "content": "a\\ud800"}]}')
    assert r.status_code == 400 and "messages[0].content" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": [-1, 5]})
    assert r.status_code == 400 and "greater than or equal to 0" in r.json()["error"]["message"]
    for raw, says in ((b'{"model": "dsv4-test", "seed": 1e400}', "too large for a float64"),
                      (b'{"metadata": ' + b"[" * 200 + b"]" * 200 + b"}", "nested more than"),
                      (b'{"metadata": ' + b"[" * 10**5 + b"]" * 10**5 + b"}", "nested more than"),
                      (b'{"seed": ' + b"9" * 5000 + b"}", "4300 digits"),
                      (b"", "empty")):
        r = _post(server, "/v1/chat/completions", raw)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    r = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": []},
              headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = _post(server, "/v1/nothing", {})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/chat/completions", headers=server.headers())
    assert r.status_code == 405 and "error" in r.json()

    cases = [
        ({}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]},
         "messages[0].content[0]"),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]},
         "tools[0].input_schema"),
        ({"tool_choice": {"type": "tool"}, "tools": ANTHROPIC_TOOLS}, "tool_choice.name"),
        ({"model": "claude-opus"}, "model"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        # the block's tag is no field: messages[0].content[0].text, not ...text.text
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text: Field required"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "1"}]}]}, "user message"),
    ]
    for change, field in cases:
        body = {"model": MODEL, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}], **change}
        if "max_tokens" in change or not change:
            body = {k: v for k, v in body.items() if k != "max_tokens" or change}
        r = _post(server, "/v1/messages", body)
        assert 400 <= r.status_code < 500, r.text
        data = r.json()
        assert data["type"] == "error" and field in data["error"]["message"], data
    r = _post(server, "/v1/messages", {"model": MODEL, "max_tokens": 200000,  # > the context
                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"], r.text
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------- operations


def test_oversized_bodies_and_prompts_are_refused_before_they_are_read(small_server):
    chat = "/v1/chat/completions"
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200_000}]}
    r = httpx.post(small_server.url + chat, json=big, timeout=30)  # by its Content-Length
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]
    body = json.dumps(big).encode()
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
    r = httpx.post(small_server.url + chat, content=chunks, timeout=30,  # chunked: no length
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    # fits the body limit, but not the 1024-token context at any split: refused untokenised
    r = httpx.post(small_server.url + chat, timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x" * 90_000}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "90" in error["message"] and "characters" in error["message"]
    assert small_server.health()["status"] == "ok"


def test_full_queue_429_and_disconnect_aborts(small_server):
    # 900 tokens: no running stream can finish, freeing a place, before the fourth arrives
    body = {"model": MODEL, "max_tokens": 900, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "disabled"}}
    before = small_server.metrics().get('dsv4_request_finish_total{reason="abort"}', 0)
    with httpx.Client(base_url=small_server.url, timeout=30) as http:
        streams = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(3)]
        responses = [s.__enter__() for s in streams]
        # keep the line iterators: one dropped mid-stream closes its connection, which the
        # server rightly takes for a hang-up and aborts (that made this test flaky)
        lines = [r.iter_lines() for r in responses[:2]]
        for r, it in zip(responses[:2], lines):  # the two running ones are generating
            assert r.status_code == 200
            next(it)
        assert responses[2].status_code == 200  # the queued one was accepted
        assert small_server.metrics()["dsv4_num_seqs_accepted"] == 3
        full = http.post("/v1/chat/completions", json=body)
        assert full.status_code == 429, full.text[-300:]
        assert int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["code"] == "rate_limit_exceeded"
        for s in streams:  # hang up mid-stream
            s.__exit__(None, None, None)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = small_server.metrics()
        if m["dsv4_num_seqs_accepted"] == 0 and m["dsv4_num_requests_running"] == 0 and \
                m["dsv4_num_requests_waiting"] == 0:
            break
        time.sleep(0.1)
    assert m["dsv4_num_requests_running"] == m["dsv4_num_requests_waiting"] == 0
    assert m["dsv4_kv_cache_usage_perc"] == 0
    assert m['dsv4_request_finish_total{reason="abort"}'] - before == 3
    assert m["dsv4_requests_rejected_total"] >= 1
    assert small_server.health()["num_unfinished_seqs"] == 0

    # a client that gives up on a non-streamed answer aborts it too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_server.url + "/v1/chat/completions", json={**body, "stream": False},
                   timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 20
    while small_server.metrics()["dsv4_num_seqs_accepted"] and time.monotonic() < deadline:
        time.sleep(0.1)
    m = small_server.metrics()
    assert m['dsv4_request_finish_total{reason="abort"}'] - before == 4
    assert m["dsv4_num_requests_running"] == m["dsv4_kv_cache_usage_perc"] == 0


def test_metrics_after_traffic(server, client):
    client.chat.completions.create(model=MODEL, messages=WEATHER, max_tokens=3)
    m = server.metrics()
    assert m['dsv4_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert m["dsv4_time_to_first_token_seconds_count"] >= 1
    assert m["dsv4_inter_token_latency_seconds_count"] >= 1
    assert m["dsv4_generation_tokens_total"] >= 3 and m["dsv4_prompt_tokens_total"] > 0
    for gauge in ("dsv4_num_requests_running", "dsv4_num_requests_waiting",
                  "dsv4_kv_cache_usage_perc"):
        assert gauge in m
    assert 'dsv4_time_to_first_token_seconds_bucket{le="+Inf"}' in m


def test_mtp_speculative_server_streams_what_the_plain_server_does(server, client, model_dir):
    """`--num-speculative-tokens 1`: a step may yield two tokens; streams, tool calls and
    logprobs must come out as from the plain server, and /metrics counts the drafts."""
    spec = ServerProcess(model_dir, "--num-speculative-tokens", "1", api_key=KEY)
    try:
        spec_client = openai.OpenAI(base_url=spec.url + "/v1", api_key=KEY, max_retries=0,
                                    timeout=60)
        asks = [dict(messages=[{"role": "user", "content": "What is 47 + 38?"}],
                     extra_body={"thinking": {"type": "enabled"}}),
                dict(messages=WEATHER, tools=TOOLS),
                # a forced call ends at its last token, even inside a two-token step (with
                # "New York" the call's closing tag ends a step's first token)
                dict(messages=[{"role": "user", "content": "What is the weather in New York?"}],
                     tools=TOOLS,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})]
        for ask in asks:
            kwargs = dict(model=MODEL, max_tokens=48, temperature=0, logprobs=True,
                          stream_options={"include_usage": True}, **ask)
            assert _stream_chat(spec_client, **kwargs) == _stream_chat(client, **kwargs)
        m = spec.metrics()
        drafts = m["dsv4_spec_decode_num_draft_tokens_total"]
        assert drafts > 0 and m["dsv4_spec_decode_num_accepted_tokens_total"] <= drafts
    finally:
        spec.stop()


# any JSON Python's parser accepts, NaN / Infinity and lone surrogates included
json_text = st.text(st.characters(categories=["L", "N", "P", "S", "Z", "Cc", "Cs"]), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)
VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 3, "tools": TOOLS[:1], "n": 1, "temperature": 0.5,
                             "stop": ["x"], "logprobs": True, "top_logprobs": 2,
                             "stream": False, "seed": 1, "tool_choice": "auto"},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 3, "n": 1,
                        "logprobs": 1, "echo": False, "stream": False},
    "/v1/messages": {"model": MODEL, "max_tokens": 3, "stream": False,
                     "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                     "system": "s", "stop_sequences": ["x"], "temperature": 0.5,
                     "thinking": {"type": "enabled", "budget_tokens": 1024}},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": [{"role": "user",
                                                                "content": "hi"}]},
}


def _paths(value, prefix=()):
    """Every place in a JSON value (dict keys and list indices), outermost first."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        yield from _paths(item, (*prefix, key))


@st.composite
def bodies(draw):
    """A random JSON value, or a valid body with a few places (at any depth) replaced by random
    JSON or deleted."""
    route = draw(st.sampled_from(sorted(VALID)))
    kind = draw(st.sampled_from(["random", "mutate", "mutate", "delete"]))
    if kind == "random":
        return route, draw(json_values)
    body = json.loads(json.dumps(VALID[route]))
    if kind == "delete":  # mostly still valid: optional fields left out
        for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=4, unique=True)):
            del body[key]
        return route, {**body, "max_tokens": 3} if "max_tokens" in VALID[route] else body
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(body))[1:]))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
        if not isinstance(body, dict) or not body:
            break
    if isinstance(body, dict) and route != "/v1/messages/count_tokens":
        mt = body.get("max_tokens")  # keep valid requests short (too long ones stay)
        if "max_tokens" not in body or (type(mt) is int and 16 < mt < 10**5):
            body["max_tokens"] = 3
    return route, body


def test_fuzz_request_bodies_never_5xx(small_server):
    http = httpx.Client(base_url=small_server.url, timeout=60)
    statuses = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))
    @given(bodies())
    def check(case):
        route, body = case
        r = http.post(route, content=json.dumps(body), headers={"content-type":
                                                                 "application/json"})
        statuses.append(r.status_code)
        assert r.status_code < 500, (route, body, r.text)
        if r.status_code >= 400:
            data = r.json()
            assert ("error" in data) and (data.get("type") == "error") == \
                route.startswith("/v1/messages")

    check()
    http.close()
    print({code: statuses.count(code) for code in sorted(set(statuses))})
    assert statuses.count(200) > len(statuses) // 20  # valid requests were generated too
    assert small_server.health()["num_unfinished_seqs"] == 0


def test_graceful_shutdown_finishes_in_flight_requests(model_dir):
    proc = ServerProcess(model_dir, "--shutdown-timeout", "20")
    body = {"model": MODEL, "max_tokens": 40, "ignore_eos": True, "stream": True,
            "logprobs": True, "messages": [{"role": "user", "content": "hi"}]}
    tokens, finish = 0, None
    with httpx.stream("POST", proc.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        proc.proc.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    tokens += len((c.get("logprobs") or {}).get("content") or [])
                    finish = c["finish_reason"] or finish
    assert finish == "length" and tokens == 40
    # it exits by itself (uvicorn re-raises the SIGTERM it handled), without a traceback
    assert proc.proc.wait(30) in (0, -signal.SIGTERM)
    proc.stop()
    assert "Traceback" not in proc.log_path.read_text()


def test_cli_refuses_a_folder_without_a_model(tmp_path, capsys):
    from dsv4.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    # bad options fail before the model is loaded, naming the option
    for flag, value in (("--port", "70000"), ("--shutdown-timeout", "nan")):
        assert main(["serve", flag, value]) == 2
        assert flag.lstrip("-").replace("-", "_").split("_")[0] in capsys.readouterr().err
