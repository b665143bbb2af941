"""`dsv4 chat` and `dsv4 generate` with the bundled dsv4-tiny: what they print is what the
engine generates for the same rendered conversation, split by V4's own parser."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from dsv4.chat import encode_messages, parse_completion
from dsv4.cli import main
from dsv4.engine.llm import LLM
from dsv4.engine.sampling_params import SamplingParams
from dsv4.server import chat_cli
from dsv4.train.data import CAPABILITIES, eval_examples
from dsv4.train.evaluate import BUNDLED


@pytest.fixture(scope="module")
def llm():
    return LLM(model=str(BUNDLED), device="cpu", dtype="fp32", max_num_seqs=1)


def _greedy(llm, messages, mode):
    """What the engine itself answers, parsed as the server would."""
    prompt = encode_messages(messages, mode)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=200,
                                              skip_special_tokens=False))[0]
    return parse_completion(out.text, mode)


def _chat(lines: list[str], *flags: str) -> str:
    parser = argparse.ArgumentParser()
    chat_cli.add_arguments(parser)
    args = parser.parse_args(["--temperature", "0", "--dtype", "fp32", *flags])
    out = io.StringIO()
    assert chat_cli.run(args, stdin=io.StringIO("".join(f"{x}\n" for x in lines)), out=out) == 0
    return out.getvalue()


def test_generate_json_reports_what_the_engine_answers(llm, capsys):
    question = next(e for e in eval_examples(40)
                    if e.family == "arithmetic" and e.thinking_mode == "thinking")
    text = question.messages[-2]["content"]
    assert main(["generate", "--temperature", "0", "--dtype", "fp32", "--json", text]) == 0
    got = json.loads(capsys.readouterr().out)
    want = _greedy(llm, question.messages[-2:-1], "thinking")
    assert got["reasoning_content"] == want["reasoning_content"] != ""
    assert got["content"] == want["content"] != ""
    assert got["finish_reason"] == "stop" and got["usage"]["completion_tokens"] > 10

    assert main(["generate", "--temperature", "0", "--no-thinking", "What can you do?"]) == 0
    assert capsys.readouterr().out.strip() == CAPABILITIES


def test_generate_refuses_an_empty_prompt(capsys):
    assert main(["generate", "  "]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_obeys_its_commands(llm):
    first, second = "My name is Priya.", "What is my name?"
    shown = _chat([first, second, "/think on", "What can you do?", "/think off", "/reset", second,
                   "/nope"], "--no-thinking")
    answer1 = _greedy(llm, [{"role": "user", "content": first}], "chat")["content"]
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": answer1},
               {"role": "user", "content": second}]
    answer2 = _greedy(llm, history, "chat")["content"]
    assert "Priya" in answer2  # dsv4-tiny was trained to recall names across turns
    alone = _greedy(llm, [{"role": "user", "content": second}], "chat")["content"]
    assert alone != answer2  # after /reset the name is gone
    thinking = _greedy(llm, [*history, {"role": "assistant", "content": answer2},
                             {"role": "user", "content": "What can you do?"}], "thinking")
    assert shown == "\n".join([
        answer1, answer2,
        "(thinking on)",
        "--- reasoning ---", thinking["reasoning_content"], "--- answer ---", thinking["content"],
        "(thinking off)", "(conversation cleared)", alone,
        "unknown command '/nope'; commands: " + chat_cli.COMMANDS, ""])  # an answer may span lines


def test_chat_survives_a_too_long_turn_and_ctrl_c(monkeypatch):
    shown = _chat(["word " * 400, "What can you do?"], "--no-thinking", "--max-model-len", "256")
    assert "error: the conversation is 1204 tokens, but the context holds 256" in shown
    assert "/reset starts a new conversation" in shown
    assert shown.rstrip().endswith(CAPABILITIES)  # the next turn is answered, without the long one

    calls = {"n": 0}
    real_reply = chat_cli.reply

    def interrupted_once(llm, *args, **kwargs):  # Ctrl-C while the first answer is written
        calls["n"] += 1
        if calls["n"] == 1:
            step = llm.engine.step

            def press_ctrl_c():
                step()
                raise KeyboardInterrupt

            llm.engine.step = press_ctrl_c
            try:
                return real_reply(llm, *args, **kwargs)
            finally:
                del llm.engine.step
                assert not llm.engine.has_unfinished_requests()  # aborted, nothing queued
        return real_reply(llm, *args, **kwargs)

    monkeypatch.setattr(chat_cli, "reply", interrupted_once)
    shown = _chat(["Hello", "What can you do?"], "--no-thinking")
    assert "(stopped; that question was dropped from the conversation)" in shown
    assert shown.rstrip().endswith(CAPABILITIES)
