"""`dsv4 eval`: how well a small V4 model does its tasks, on the held-out split.

- arithmetic_accuracy: the parsed answer equals the exact result;
- tool_call_accuracy: the output parses to exactly one call of the right tool with the right
  arguments;
- final_answer_accuracy: after the tool's result, the answer is the expected sentence;
- chat_accuracy: conversational replies (greetings, recall across turns) exactly right;
- breakdown: each accuracy split by mode and task ("arithmetic/chat/*",
  "tool_call/thinking/convert_units", "chat/chat/colour"), to see which skill is missing;
- misses (with `--misses`): every wrong generation, its question, what was expected and the
  model's whole output (reasoning included), to see where it went wrong;
- mtp_acceptance: how often the MTP head's draft of token t+2 equals the model's own greedy
  choice there, on the reference answers (teacher forcing): the acceptance rate a
  speculative decoder would see.

Generation runs through the engine (greedy, all prompts batched).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsv4.chat import Tokenizer, encode_messages, parse_completion
from dsv4.train.data import Example, eval_examples

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "dsv4-tiny"


def _prompts(examples: list[Example]) -> list[tuple[str, Example, str]]:
    """(prompt text, example, what is checked) for every generation the eval needs."""
    out = []
    for e in examples:
        m, mode = e.messages, e.thinking_mode
        if e.family == "tool":
            out.append((encode_messages(m[:2], mode), e, "call"))
            out.append((encode_messages(m[:4], mode), e, "final"))
        else:
            out.append((encode_messages(m[:-1], mode), e, "answer"))
    return out


def _task(e: Example) -> str:
    """The sub-task an example tests: the operator, the tool, or the kind of conversation."""
    if e.family == "tool":
        return e.expected["tool"]
    return e.spec[1]


def _expected(kind: str, e: Example):
    if e.family == "arithmetic":
        return e.expected["answer"]
    if e.family == "chat":
        return e.expected["reply"]
    if kind == "call":
        return {"name": e.expected["tool"], "arguments": e.expected["arguments"]}
    return e.expected["final"]


def _score(kind: str, e: Example, message: dict) -> tuple[str, bool]:
    if e.family == "arithmetic":
        return "arithmetic", message["content"].strip() == str(e.expected["answer"])
    if e.family == "chat":
        return "chat", message["content"].strip() == e.expected["reply"]
    if kind == "call":
        calls = message["tool_calls"]
        ok = len(calls) == 1 and calls[0]["function"]["name"] == e.expected["tool"]
        if ok:
            try:
                ok = json.loads(calls[0]["function"]["arguments"]) == e.expected["arguments"]
            except json.JSONDecodeError:
                ok = False
        return "tool_call", ok
    return "final_answer", message["content"].strip() == e.expected["final"]


@torch.inference_mode()
def mtp_acceptance(model, tokenizer: Tokenizer, examples: list[Example]) -> float:
    from dsv4.train.trainer import render

    agree = total = 0
    device = next(model.parameters()).device
    for e in examples:
        ids, mask = render(e, tokenizer)
        x = torch.tensor([ids], device=device)
        streams = model.forward_streams(x)
        greedy = model._head(streams, model, model.norm).argmax(-1)[0]  # choice for t + 1
        draft = model.mtp_forward(streams[:, :-2], x[:, 1:-1]).argmax(-1)[0]  # for t + 2
        targets = torch.tensor(mask[2:], device=device)
        agree += int(((draft == greedy[1:-1]) & targets).sum())
        total += int(targets.sum())
    return agree / max(total, 1)


def evaluate(model_path: str | Path, num_examples: int = 200, device: str = "cpu",
             dtype: str = "fp32", max_tokens: int = 160, misses: bool = False) -> dict:
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling_params import SamplingParams

    tokenizer = Tokenizer.from_folder(model_path)
    examples = eval_examples(num_examples)
    jobs = _prompts(examples)
    llm = LLM(model=str(model_path), device=device, dtype=dtype, max_num_seqs=64,
              max_num_batched_tokens=4096, tokenizer=tokenizer)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate([tokenizer.encode(p) for p, _, _ in jobs], params)
    right: dict[str, list[bool]] = {}
    by_task: dict[str, list[bool]] = {}
    wrong = []
    for (_, e, kind), out in zip(jobs, outs):
        text = tokenizer.decode(out.token_ids)
        name, ok = _score(kind, e, parse_completion(text, e.thinking_mode))
        task = f"{name}/{e.thinking_mode}/{_task(e)}"
        right.setdefault(name, []).append(ok)
        by_task.setdefault(task, []).append(ok)
        if not ok:
            question = next(m["content"] for m in reversed(e.messages) if m["role"] == "user")
            wrong.append({"task": task, "question": question,
                          "expected": _expected(kind, e), "output": text})
    result = {f"{k}_accuracy": sum(v) / len(v) for k, v in right.items()}
    model = llm.engine.runner.model
    result["mtp_acceptance"] = mtp_acceptance(model, tokenizer, examples[:50])
    result["num_examples"] = len(examples)
    result["breakdown"] = {k: f"{sum(v)}/{len(v)}" for k, v in sorted(by_task.items())}
    if misses:
        result["misses"] = wrong
    result["model"] = str(model_path)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(BUNDLED), help="model folder (default: dsv4-tiny)")
    parser.add_argument("--num-examples", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--misses", action="store_true",
                        help="also list every wrong answer with the model's whole output")


def run(args: argparse.Namespace) -> int:
    if args.num_examples < 1:
        raise ValueError(f"--num-examples must be at least 1, got {args.num_examples}")
    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"{args.model} is not a model folder (no config.json); train one with "
                         "`dsv4 train --out DIR` or pass --model")
    result = evaluate(args.model, args.num_examples, args.device, misses=args.misses)
    if args.json:
        print(json.dumps(result))
        return 0
    breakdown = result.pop("breakdown")
    wrong = result.pop("misses", [])
    for k, v in result.items():
        print(f"{k:<24} {v:.3f}" if isinstance(v, float) else f"{k:<24} {v}")
    print("right / asked, by score, mode and task:")
    for k, v in breakdown.items():
        print(f"  {k:<40} {v}")
    for miss in wrong:
        print(f"\nmissed {miss['task']}: {miss['question']!r}\n  expected {miss['expected']!r}"
              f"\n  output   {miss['output']!r}")
    return 0
