"""`dsv4 generate`: one answer to one prompt, printed as it is generated.

    dsv4 generate "What is 47 + 38?"                     # the bundled dsv4-tiny, thinking on
    dsv4 generate --no-thinking --temperature 0 --json "Who are you?"
    echo "Hi" | dsv4 generate -

`--json` prints one object instead: reasoning_content, content, tool_calls, finish_reason and
usage, as an OpenAI chat completion's message reports them.
"""

from __future__ import annotations

import argparse
import json
import sys

from dsv4.server.chat_cli import add_model_arguments, load_llm, reply, sampling_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user's message; '-' reads it from stdin")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("the prompt is empty; pass the message to answer, or '-' to read it "
                         "from stdin")
    llm = load_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    answer = reply(llm, messages, args.thinking, args.reasoning_effort, sampling_params(args),
                   None if args.json else sys.stdout, show_reasoning=not args.hide_reasoning)
    if args.json:
        print(json.dumps({
            "reasoning_content": answer.reasoning, "content": answer.content,
            "tool_calls": answer.tool_calls, "finish_reason": answer.finish_reason,
            "usage": {"prompt_tokens": answer.prompt_tokens,
                      "completion_tokens": answer.completion_tokens},
        }, ensure_ascii=False))
    return 0
