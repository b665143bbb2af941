"""One request at a time, decoding with the MTP layer as drafter (num_speculative_tokens=1)
against plain decoding and against transformers' `generate`, on the same weights, in the same
process.

The model is the bundled dsv4-tiny, because drafting is only worth measuring with a trained
MTP layer (a random one's drafts are all rejected). It runs in fp32 on held-out chat prompts
(thinking-mode arithmetic and tool calls, whose answers are tens of tokens long), greedy until
EOS. The three systems must produce the same tokens (checked before timing). As in
engine_throughput.py each system is also timed for one output token (its prefill), so the
decode phase is reported apart from the end-to-end time. Then plain and drafting engines are
compared with 8 and 32 requests at once. Prints a table, then one JSON line.

    python benchmarks/mtp_speculative.py [--prompts 6 --max-tokens 160 --concurrency 8,32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import measure, median_seconds  # noqa: E402
from v4_oracle import hf_model_from  # noqa: E402

from dsv4.chat import Tokenizer  # noqa: E402
from dsv4.engine.llm import LLM  # noqa: E402
from dsv4.engine.sampling_params import SamplingParams  # noqa: E402
from dsv4.train.data import eval_examples  # noqa: E402
from dsv4.train.evaluate import BUNDLED, _prompts  # noqa: E402


def held_out_prompts(tokenizer: Tokenizer, count: int) -> list[list[int]]:
    """Thinking-mode arithmetic and tool prompts of the evaluation split, alternating."""
    examples = [e for e in eval_examples(200) if e.thinking_mode == "thinking"]
    kinds = [[e for e in examples if e.family == f] for f in ("arithmetic", "tool")]
    picked = [kinds[i % 2][i // 2] for i in range(count)]
    return [tokenizer.encode(p) for p, _, _ in _prompts(picked)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=6,
                        help="held-out examples; a tool example gives two prompts (its call "
                             "and its final answer)")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",") if c],
                        default=[8, 32], help="also compare plain and drafting engines with "
                        "this many requests at once (comma-separated; empty to skip)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per measurement; the median is reported (CPU timings vary)")
    opts = parser.parse_args()
    tokenizer = Tokenizer.from_folder(BUNDLED)
    prompts = held_out_prompts(tokenizer, opts.prompts)
    engines = {
        name: LLM(model=str(BUNDLED), device="cpu", dtype="fp32", max_num_seqs=1,
                  num_speculative_tokens=drafts, tokenizer=tokenizer)
        for name, drafts in (("dsv4 engine", 0), ("dsv4 engine + MTP", 1))
    }
    hf = hf_model_from(engines["dsv4 engine"].engine.runner.model)
    eos = tokenizer.eos_id

    def engine_run(llm):
        def run(n):
            outs = [llm.generate([p], SamplingParams(temperature=0, max_tokens=n))[0]
                    for p in prompts]
            return [o.token_ids for o in outs]
        return run

    def hf_run(n):
        outs = []
        with torch.inference_mode():
            for p in prompts:
                out = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)
                outs.append(out[0, len(p):].tolist())
        return outs

    runs = {name: engine_run(llm) for name, llm in engines.items()}
    runs["transformers generate"] = hf_run
    reference = None
    for name, run in runs.items():  # also the warm-up
        tokens = run(opts.max_tokens)
        if reference is None:
            reference = tokens
        elif tokens != reference:
            raise SystemExit(f"{name} generated different tokens from the dsv4 engine")
    scheduler = engines["dsv4 engine + MTP"].engine.scheduler
    drafted, accepted = scheduler.num_draft_tokens, scheduler.num_accepted_draft_tokens

    systems = {(name, len(prompts)): (lambda n, run=run: sum(len(t) for t in run(n)))
               for name, run in runs.items()}
    rows = {r["system"]: r for r in measure(systems, opts.max_tokens, opts.repeats)}
    print(f"{'system':<22} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'prefill s':>9} "
          f"{'decode tok/s':>12}")
    for r in rows.values():
        print(f"{r['system']:<22} {r['output_tokens']:>7} {r['seconds']:>8.2f} "
              f"{r['output_tok_s']:>8.1f} {r['prefill_seconds']:>9.3f} {r['decode_tok_s']:>12.1f}")
    plain, spec, hf_row = (rows[name] for name in runs)

    def ratio(a, b, key):
        return a[key] / b[key]

    summary = {
        "draft_acceptance": accepted / max(drafted, 1),
        "mtp_vs_plain": ratio(spec, plain, "output_tok_s"),
        "mtp_decode_vs_plain": ratio(spec, plain, "decode_tok_s"),
        "mtp_vs_transformers": ratio(spec, hf_row, "output_tok_s"),
        "mtp_decode_vs_transformers": ratio(spec, hf_row, "decode_tok_s"),
        "plain_decode_vs_transformers": ratio(plain, hf_row, "decode_tok_s"),
    }
    print(f"drafts accepted: {summary['draft_acceptance']:.1%} of {drafted}; with MTP one "
          f"request decodes {summary['mtp_decode_vs_plain']:.2f}x plain decoding and "
          f"{summary['mtp_decode_vs_transformers']:.2f}x transformers "
          f"({summary['mtp_vs_transformers']:.2f}x end to end); plain decoding is "
          f"{summary['plain_decode_vs_transformers']:.2f}x transformers")
    summary["concurrent"] = [concurrent(tokenizer, c, opts) for c in opts.concurrency]
    print(json.dumps({"benchmark": "mtp_speculative", "model": "dsv4-tiny (bundled), fp32",
                      "prompts": len(prompts), "rows": list(rows.values()), **summary}))
    return 0


def concurrent(tokenizer: Tokenizer, num_requests: int, opts) -> dict:
    """Plain vs drafting engine with `num_requests` held-out prompts submitted together
    (prefill included); both must write the same tokens."""
    count = opts.prompts
    while len(held_out_prompts(tokenizer, count)) < num_requests:
        count += 1
    prompts = held_out_prompts(tokenizer, count)[:num_requests]
    params = SamplingParams(temperature=0, max_tokens=opts.max_tokens)
    result = {"requests": num_requests}
    outputs = []
    for key, drafts in (("plain_tok_s", 0), ("mtp_tok_s", 1)):
        llm = LLM(model=str(BUNDLED), device="cpu", dtype="fp32", max_num_seqs=num_requests,
                  num_speculative_tokens=drafts, tokenizer=tokenizer)
        outputs.append([o.token_ids for o in llm.generate(prompts, params)])  # also warm-up
        seconds, _ = median_seconds(lambda llm=llm: llm.generate(prompts, params), opts.repeats)
        result[key] = sum(len(t) for t in outputs[-1]) / seconds
    if outputs[0] != outputs[1]:
        raise SystemExit(f"drafting changed the outputs at {num_requests} requests")
    result["mtp_vs_plain"] = result["mtp_tok_s"] / result["plain_tok_s"]
    print(f"{num_requests} requests at once: plain {result['plain_tok_s']:.1f} tok/s, with MTP "
          f"{result['mtp_tok_s']:.1f} tok/s ({result['mtp_vs_plain']:.2f}x)")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
