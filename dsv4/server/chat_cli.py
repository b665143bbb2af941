"""`dsv4 chat`: talk to a V4 model in the terminal, with no server in between.

    dsv4 chat                                    # the bundled dsv4-tiny, thinking on
    dsv4 chat --model /models/DeepSeek-V4-Flash --device cuda --no-thinking

Each turn goes the way an HTTP request does (V4's encoder renders the conversation, the
engine generates, the stream parser splits reasoning from the answer) and is printed as it is
generated. Lines starting with "/" are commands: /think on|off, /reset, /exit. Ctrl-C stops
the answer being written and keeps the conversation; Ctrl-D or /exit leaves.
`reply()` is shared with `dsv4 generate`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from typing import TextIO

from dsv4.chat import (
    ContentDelta,
    ReasoningDelta,
    StreamParser,
    ToolCallArgsDelta,
    ToolCallStart,
    encode_messages,
)
from dsv4.server.config import BUNDLED_MODEL

DIM, RESET = "\033[2m", "\033[0m"
COMMANDS = "/think on|off (reasoning), /reset (forget the conversation), /exit"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What `dsv4 chat` and `dsv4 generate` share: the model and how to sample from it."""
    parser.add_argument("--model", default=str(BUNDLED_MODEL),
                        help="V4 checkpoint folder with its tokenizer.json (default: dsv4-tiny)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or npu (default: best)")
    parser.add_argument("--dtype", default=None,
                        help="bf16, fp16 or fp32 (default: bf16, or fp32 on a CPU without "
                             "bf16 matmuls)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest conversation + answer in tokens (default: the model's)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step first (CPU; a minute or more the first "
                             "time, then about 2x faster tokens)")
    thinking = parser.add_mutually_exclusive_group()
    thinking.add_argument("--thinking", dest="thinking", action="store_true", default=True,
                          help="reason before answering (the default, as in DeepSeek's API)")
    thinking.add_argument("--no-thinking", dest="thinking", action="store_false",
                          help="answer at once (V4's chat mode)")
    parser.add_argument("--reasoning-effort", choices=("high", "max"), default=None,
                        help="'max' adds V4's maximum-effort preamble to the prompt")
    parser.add_argument("--hide-reasoning", action="store_true",
                        help="do not print the reasoning, only the answer")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens per answer")
    parser.add_argument("--seed", type=int, default=None)


def load_llm(args: argparse.Namespace):
    from dsv4.engine.llm import LLM

    if args.compile:
        print("compiling the decode step (a minute or more the first time on a CPU)...",
              file=sys.stderr, flush=True)
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=1,
              max_model_len=args.max_model_len, compile=args.compile)
    if llm.engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; chat needs the model's tokenizer "
                         "next to its weights")
    return llm


def sampling_params(args: argparse.Namespace):
    from dsv4.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p,
                          max_tokens=args.max_tokens, seed=args.seed,
                          skip_special_tokens=False)  # the parser needs the markup


@dataclass
class Reply:
    """One answer, parsed: what goes back into the conversation and what was spent."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI form
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def message(self) -> dict:
        """The turn as the conversation keeps it. A tool call has no tool here to answer it,
        so only its text is kept."""
        out = {"role": "assistant", "content": self.content}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        return out


class _Printer:
    """Reasoning dimmed (or, when not a terminal, under a '--- reasoning ---' line and the
    answer under '--- answer ---'), then the answer, as the deltas come."""

    def __init__(self, out: TextIO | None, show_reasoning: bool):
        self.out, self.show_reasoning = out, show_reasoning  # False: no reasoning, no rules
        self.tty = out is not None and out.isatty()
        self.section: str | None = None

    def write(self, section: str, text: str) -> None:
        if self.out is None or not text or (section == "reasoning" and not self.show_reasoning):
            return
        if section != self.section:
            if self.tty:
                self.out.write(DIM if section == "reasoning" else RESET + "\n" * bool(self.section))
            elif self.show_reasoning:
                self.out.write(("\n" if self.section else "") + f"--- {section} ---\n")
            self.section = section
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.out is not None and self.section is not None:
            self.out.write((RESET if self.tty else "") + "\n")
            self.out.flush()


def reply(llm, messages: list[dict], thinking: bool, reasoning_effort: str | None,
          params, out: TextIO | None, show_reasoning: bool = True) -> Reply:
    """Generate the assistant's next turn of `messages` (V4's thinking mode when `thinking`,
    at `reasoning_effort`; else chat mode), printing it to `out` as it comes. Ctrl-C aborts
    the request (nothing stays queued) and is raised again."""
    engine, tokenizer = llm.engine, llm.engine.tokenizer
    thinking_mode = "thinking" if thinking else "chat"
    reasoning_effort = reasoning_effort if thinking else None
    prompt = tokenizer.encode(encode_messages(messages, thinking_mode, reasoning_effort))
    room = engine.scheduler.max_seq_len - len(prompt)
    if room < 1:
        raise ValueError(f"the conversation is {len(prompt)} tokens, but the context holds "
                         f"{engine.scheduler.max_seq_len} (prompt + answer)")
    # as vLLM does, --max-tokens is a cap: a long conversation gets what room is left
    request_id = engine.add_request(prompt, replace(params, max_tokens=min(params.max_tokens,
                                                                           room)))
    parser = StreamParser(thinking_mode)
    printer = _Printer(out, show_reasoning and thinking_mode == "thinking")
    result, calls = Reply(prompt_tokens=len(prompt)), {}
    shown, finished = 0, None

    def take(events) -> None:
        for ev in events:
            if isinstance(ev, ReasoningDelta):
                result.reasoning += ev.text
                printer.write("reasoning", ev.text)
            elif isinstance(ev, ContentDelta):
                result.content += ev.text
                printer.write("answer", ev.text)
            elif isinstance(ev, ToolCallStart):
                calls[ev.index] = {"id": ev.id, "type": "function",
                                   "function": {"name": ev.name, "arguments": ""}}
                printer.write("tool call", f"{ev.name} ")
            elif isinstance(ev, ToolCallArgsDelta):
                calls[ev.index]["function"]["arguments"] += ev.json_fragment
                printer.write("tool call", ev.json_fragment)

    try:
        while finished is None:
            for output in engine.step():
                if output.request_id == request_id:
                    take(parser.feed(output.text[shown:]))
                    shown = len(output.text)
                    if output.finished:
                        finished = output
    except BaseException:
        engine.abort(request_id)
        printer.end()
        raise
    take(parser.finish())
    printer.end()
    result.tool_calls = [calls[i] for i in sorted(calls)]
    result.finish_reason = "tool_calls" if result.tool_calls else finished.finish_reason
    result.completion_tokens = len(finished.token_ids)
    return result


add_arguments = add_model_arguments  # `dsv4 chat` takes nothing more


def run(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    llm = load_llm(args)
    params = sampling_params(args)
    thinking = args.thinking
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = stdin.isatty()
    if interactive:
        print(f"dsv4 chat: {args.model} ({'thinking' if thinking else 'chat'} mode). "
              f"Commands: {COMMANDS}.", file=out)
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:  # Ctrl-D or the end of piped input
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, value = text.partition(" ")
            if command == "/exit":
                return 0
            if command == "/reset":
                messages = list(start)
                print("(conversation cleared)", file=out)
            elif command == "/think" and value in ("on", "off"):
                thinking = value == "on"
                print(f"(thinking {value})", file=out)
            else:
                print(f"unknown command {text!r}; commands: {COMMANDS}", file=out)
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = reply(llm, messages, thinking, args.reasoning_effort, params, out,
                           show_reasoning=not args.hide_reasoning)
        except KeyboardInterrupt:
            messages.pop()
            print("(stopped; that question was dropped from the conversation)", file=out)
            continue
        except ValueError as exc:  # the conversation no longer fits the context
            messages.pop()
            print(f"error: {exc}\n(/reset starts a new conversation)", file=out)
            continue
        messages.append(answer.message())
        if answer.finish_reason == "length":
            print(f"(cut at --max-tokens {args.max_tokens} or the context length)", file=out)
