"""Output tokens/s of the engine at 1, 8 and 32 concurrent requests on a small V4 config, and
of transformers' `generate` on the same weights, in the same process.

Targets (engine issue): 32 concurrent requests reach at least 8x the single-request
throughput, and a single request decodes at least 2x faster than transformers. Each system is
also timed for one output token (the prefill), so the table splits the time into prefill and
decode: the first target is end to end, the second is about the decode phase.
Also reports the hardware limit of a single request: the weights one decode step must read
(routed experts at k of E), over the memory bandwidth a large matrix-vector product reaches
in this process; and the FLOP rate of the widest level's prefill, against what a matrix
product of the experts' shape reaches in this process. Prints a table, then one JSON line.

    python benchmarks/engine_throughput.py [--prompt-len 256 --output-len 64] [--compile]

With --compile the engine rows are run twice, eagerly and with `compile=True` (decode steps
through torch.compile'd graphs), in the same process; compiling happens before the timing and
its time is reported apart, as a server's start-up would be.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_cpu import SMALL  # noqa: E402
from v4_oracle import hf_model, released_state_dict, tiny_args  # noqa: E402

from dsv4.checkpoint.writer import write_checkpoint  # noqa: E402
from dsv4.engine.llm import LLM  # noqa: E402
from dsv4.engine.sampling_params import SamplingParams  # noqa: E402


def decode_weight_bytes(model) -> float:
    """Bytes of weights one decode token reads: every matrix once, routed experts at k / E
    (a token uses k of them), one embedding row; the MTP layer is not run (plain decoding)."""
    args = model.args
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        size = p.numel() * p.element_size()
        if name.startswith("embed."):
            size = p.shape[1] * p.element_size()
        elif ".experts." in name:
            size *= args.num_experts_per_tok / args.n_routed_experts
        total += size
    return total


def prefill_flops(model, prompt_len: int) -> float:
    """FLOPs one prompt's prefill needs: every weight matrix once per token (routed experts at
    k of E; the embedding is a lookup; the head and its mHC mix run for the last token only),
    and attention's q.k and p.v over the keys each token sees: its window, then CSA's top-k
    entries (plus the indexer scoring all of them) or all of HCA's. Work the engine does beyond
    that (whole window bands, padding) is not counted."""
    args = model.args
    per_token, last_token = 0.0, 0.0
    for name, p in model.named_parameters():
        if p.dim() != 2 or name.startswith(("mtp.", "embed.")) or name.endswith(".ape"):
            continue
        share = args.num_experts_per_tok / args.n_routed_experts if ".experts." in name else 1
        if name.startswith(("head.", "hc_head")):
            last_token += 2 * p.numel()
        else:
            per_token += 2 * p.numel() * share
    attention = 0.0
    for ratio in args.compress_ratios[:args.num_hidden_layers]:
        for pos in range(prompt_len):
            keys, entries = min(pos + 1, args.sliding_window), (pos + 1) // max(ratio, 1)
            if ratio == 4:
                keys += min(entries, args.index_topk)
                attention += 2 * args.index_n_heads * args.index_head_dim * entries
            elif ratio:
                keys += entries
            attention += 4 * args.num_attention_heads * args.head_dim * keys
    return per_token * prompt_len + last_token + attention


def matmul_rate(rows: int, dim: int, inter: int, dtype: torch.dtype,
                repeats: int = 10) -> float:
    """FLOP/s of a [rows, dim] x [dim, inter] product in `dtype`, the routed experts' first
    matrix over a step's token budget: the shape that carries most of a prefill's FLOPs."""
    a, w = torch.randn(rows, dim, dtype=dtype), torch.randn(inter, dim, dtype=dtype)
    with torch.inference_mode():
        seconds, _ = median_seconds(lambda: torch.nn.functional.linear(a, w), repeats)
    return 2 * rows * dim * inter / seconds


def read_bandwidth(megabytes: int = 64, repeats: int = 20) -> float:
    """Bytes/s of a matrix-vector product over a matrix much larger than the caches."""
    n = math.isqrt((megabytes << 20) // 4)  # an n x n fp32 matrix of that size
    w, v = torch.randn(n, n), torch.randn(1, n)
    for _ in range(3):
        v @ w.T
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        v @ w.T
        times.append(time.perf_counter() - start)
    return w.numel() * w.element_size() / statistics.median(times)


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(systems: dict, output_len: int, repeats: int) -> list[dict]:
    """Time each system's `run(n)` (generate up to n tokens for each of its requests, return
    the tokens made) for the full output and for one token, `repeats` rounds, interleaved:
    every round runs every system once, so a box whose speed drifts during the run (shared
    2-core VMs drift by 30%) slows all rows alike, not whichever came last. Medians per row.
    One token is the prefill plus a sample; the difference is the decode phase, so decode
    tok/s counts the tokens after each request's first."""
    full, first, tokens = ({key: [] for key in systems} for _ in range(3))
    for _ in range(repeats):
        for key, run in systems.items():
            start = time.perf_counter()
            tokens[key] = run(output_len)
            full[key].append(time.perf_counter() - start)
            start = time.perf_counter()
            run(1)
            first[key].append(time.perf_counter() - start)
    rows = []
    for key in systems:
        system, num_requests = key
        seconds, prefill = statistics.median(full[key]), statistics.median(first[key])
        # a few output tokens after a long prompt take less time than the prefill's noise:
        # no decode rate then (nan), rather than one divided by a difference of ~0
        decode_s = seconds - prefill
        rows.append({"system": system, "requests": num_requests,
                     "output_tokens": tokens[key], "seconds": seconds,
                     "output_tok_s": tokens[key] / seconds, "prefill_seconds": prefill,
                     "decode_tok_s": (tokens[key] - num_requests) / decode_s
                     if decode_s > 0.1 * seconds else float("nan")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per measurement; the median is reported (CPU timings vary)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights and activations of both systems (bf16: what a CPU with "
                             "bf16 matmuls loads by default)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the engine with compile=True (compiled decode steps)")
    opts = parser.parse_args()
    args = tiny_args(**SMALL)
    hf = hf_model(args)
    g = torch.Generator().manual_seed(0)
    levels = [int(c) for c in opts.concurrency.split(",")]
    prompts = [torch.randint(2, args.vocab_size, (opts.prompt_len,), generator=g).tolist()
               for _ in range(max(levels))]
    engines = {"dsv4 engine": False, **({"dsv4 engine, compiled": True} if opts.compile else {})}
    llms, build_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(released_state_dict(hf, args), tmp, config=args.to_dict())
        for name, compiled in engines.items():
            start = time.perf_counter()
            llms[name] = LLM(model=tmp, device="cpu", dtype=opts.dtype,
                             max_num_seqs=max(levels), max_num_batched_tokens=2048,
                             kv_cache_memory_bytes=256 << 20, compile=compiled)
            build_s[compiled] = time.perf_counter() - start
    # the compiled engine's start-up beyond the eager one's (loading the same weights)
    compile_s = build_s[True] - build_s[False] if opts.compile else None
    for llm in llms.values():
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    model = llms["dsv4 engine"].engine.runner.model
    weight_bytes = decode_weight_bytes(model)
    torch_dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    hf.to(torch_dtype)

    def engine_run(n, c, llm):
        outs = llm.generate(prompts[:c], SamplingParams(temperature=0, max_tokens=n,
                                                        ignore_eos=True))
        return sum(len(o.token_ids) for o in outs)

    def hf_run(n):
        with torch.inference_mode():
            out = hf.generate(torch.tensor(prompts[:1]), max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        return out.shape[1] - opts.prompt_len

    systems = {(name, c): functools.partial(engine_run, c=c, llm=llm)
               for name, llm in llms.items() for c in levels}
    systems[("transformers generate", 1)] = hf_run
    rows = measure(systems, opts.output_len, opts.repeats)

    def row(system, requests):
        return next(r for r in rows if r["system"] == system and r["requests"] == requests)

    hf_row = row("transformers generate", 1)
    print(f"{'system':<22} {'concurrency':>11} {'tokens':>7} {'seconds':>8} {'tok/s':>8} "
          f"{'vs 1 req':>8} {'prefill s':>9} {'decode tok/s':>12}")
    for r in rows:
        scale = r["output_tok_s"] / row(r["system"], 1)["output_tok_s"]
        print(f"{r['system']:<22} {r['requests']:>11} {r['output_tokens']:>7} "
              f"{r['seconds']:>8.2f} {r['output_tok_s']:>8.1f} {scale:>7.2f}x "
              f"{r['prefill_seconds']:>9.3f} {r['decode_tok_s']:>12.1f}")
    bandwidth = read_bandwidth()
    bound = bandwidth / weight_bytes  # decode tokens/s if reading the weights were all it cost
    summaries = {}
    for name in engines:
        single, widest = row(name, 1), row(name, max(levels))
        summary = {"scaling_at_max_concurrency": widest["output_tok_s"] / single["output_tok_s"],
                   "decode_scaling_at_max_concurrency":
                       widest["decode_tok_s"] / single["decode_tok_s"],
                   "single_request_vs_transformers":
                       single["output_tok_s"] / hf_row["output_tok_s"],
                   "single_request_decode_vs_transformers":
                       single["decode_tok_s"] / hf_row["decode_tok_s"],
                   "single_request_of_bound": single["decode_tok_s"] / bound}
        summaries[name] = summary
        print(f"{name} at {max(levels)} requests: {summary['scaling_at_max_concurrency']:.1f}x "
              f"one request end to end, {summary['decode_scaling_at_max_concurrency']:.1f}x in "
              f"decode; one request vs transformers: "
              f"{summary['single_request_vs_transformers']:.2f}x end to end, "
              f"{summary['single_request_decode_vs_transformers']:.2f}x in decode")
    if compile_s is not None:
        print(f"compiling the decode step took {compile_s:.0f} s before the timing")
    print(f"one decode token reads {weight_bytes / 1e6:.1f} MB of weights; at "
          f"{bandwidth / 1e9:.1f} GB/s that bounds one request at {bound:.0f} tok/s: "
          + ", ".join(f"{name} decodes at {s['single_request_of_bound']:.0%} of it"
                      for name, s in summaries.items())
          + f", transformers at {hf_row['decode_tok_s'] / bound:.0%}")
    prefill_gflop = max(levels) * prefill_flops(model, opts.prompt_len) / 1e9
    mm_gflop_s = matmul_rate(2048, args.hidden_size, args.moe_intermediate_size,
                             torch_dtype) / 1e9
    for name in engines:
        rate = prefill_gflop / row(name, max(levels))["prefill_seconds"]
        summaries[name]["prefill_gflop_s"] = rate
        print(f"{name}: the {max(levels)} prompts' prefill needs {prefill_gflop:.0f} GFLOP, "
              f"run at {rate:.0f} GFLOP/s, {rate / mm_gflop_s:.0%} of a 2048 x "
              f"{args.hidden_size} x {args.moe_intermediate_size} {opts.dtype} matmul's "
              f"{mm_gflop_s:.0f} GFLOP/s here; at that rate it would take "
              f"{prefill_gflop / mm_gflop_s:.2f} s")
    print(json.dumps({"benchmark": "engine_throughput", "prompt_len": opts.prompt_len,
                      "dtype": opts.dtype, "output_len": opts.output_len, "config": SMALL,
                      "rows": rows, "engines": summaries, "compile_s": compile_s,
                      "decode_weight_mb": weight_bytes / 1e6, "read_gb_s": bandwidth / 1e9,
                      "decode_bound_tok_s": bound, "prefill_gflop": prefill_gflop,
                      "matmul_gflop_s": mm_gflop_s,
                      "transformers_of_bound": hf_row["decode_tok_s"] / bound}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
