"""Prefill and decode speed of dsv4's V4 model on the CPU, as ratios against `transformers`'
DeepseekV4ForCausalLM on the same weights in the same process.

Prefill cost must grow near-linearly in the prompt length (16k costs at most 5x of 4k):
dsv4 gathers window + top-k keys per query, where an S x S mask would grow quadratically.
Prints a table, then one JSON line.

    python benchmarks/model_cpu.py [--lengths 1024,4096,16384] [--hf-max-len 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from v4_oracle import hf_model, released_state_dict, tiny_args  # noqa: E402

import dsv4  # noqa: E402
from dsv4.checkpoint.writer import write_checkpoint  # noqa: E402

# Small, but with V4's proportions where they decide how cost scales: the released window
# (128) and ratios (4, 128), and an indexer that is cheap next to the rest of a layer (in
# V4-Flash the indexer's work per cached key is ~1e-6 of a token's forward FLOPs; here 3e-5).
SMALL = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
             head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=4, o_lora_rank=128,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
             index_n_heads=4, index_head_dim=64, index_topk=64, sliding_window=128,
             compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1,
             max_position_embeddings=65536)


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--hf-max-len", type=int, default=4096,
                        help="longest prompt to time transformers on (it builds S x S masks)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    args = tiny_args(**SMALL)
    hf = hf_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(released_state_dict(hf, args), tmp, config=args.to_dict())
        ours = dsv4.load_model(tmp, device="cpu", dtype=torch.float32, kv_cache_dtype="auto",
                               indexer_cache_dtype="auto")
    rows = []
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in opts.lengths.split(",")]
    prompts = {n: torch.randint(2, args.vocab_size, (1, n), generator=g) for n in lengths}
    # dsv4 first: transformers' S x S masks leave the allocator fragmented for what follows
    ours_times = {n: timed(lambda ids=ids: ours.score(ids), repeats=2)
                  for n, ids in prompts.items()}
    for length, ids in prompts.items():
        hf_s = timed(lambda ids=ids: hf(ids)) if length <= opts.hf_max_len else None
        ours_s = ours_times[length]
        rows.append({"phase": "prefill", "tokens": length, "dsv4_s": ours_s,
                     "transformers_s": hf_s,
                     "speedup_vs_transformers": hf_s / ours_s if hf_s else None})
    prompt = torch.randint(2, args.vocab_size, (1, 512), generator=g)
    n = opts.decode_tokens
    ours_total = timed(lambda: ours.generate(prompt, max_new_tokens=n))
    ours_prefill = timed(lambda: ours.score(prompt))
    hf_total = timed(lambda: hf.generate(prompt, max_new_tokens=n, do_sample=False,
                                         eos_token_id=None, pad_token_id=0))
    hf_prefill = timed(lambda: hf(prompt))
    ours_tps = n / max(ours_total - ours_prefill, 1e-9)
    hf_tps = n / max(hf_total - hf_prefill, 1e-9)
    rows.append({"phase": "decode", "tokens": n, "dsv4_tok_s": ours_tps,
                 "transformers_tok_s": hf_tps, "speedup_vs_transformers": ours_tps / hf_tps})
    prefill = {r["tokens"]: r["dsv4_s"] for r in rows if r["phase"] == "prefill"}
    growth = prefill[16384] / prefill[4096] if {4096, 16384} <= set(prefill) else None

    print(f"{'phase':<8} {'tokens':>7} {'dsv4':>12} {'transformers':>14} {'dsv4 speedup':>13}")
    for r in rows:
        if r["phase"] == "prefill":
            hf_text = f"{r['transformers_s']:.3f} s" if r["transformers_s"] else "skipped"
            sp = f"{r['speedup_vs_transformers']:.2f}x" if r["speedup_vs_transformers"] else "-"
            print(f"{'prefill':<8} {r['tokens']:>7} {r['dsv4_s']:>10.3f} s {hf_text:>14} {sp:>13}")
        else:
            print(f"{'decode':<8} {r['tokens']:>7} {r['dsv4_tok_s']:>8.1f} tok/s "
                  f"{r['transformers_tok_s']:>8.1f} tok/s {r['speedup_vs_transformers']:>12.2f}x")
    if growth:
        print(f"prefill 16k / 4k cost: {growth:.2f}x (linear would be 4x; the bar is 5x)")
    print(json.dumps({"benchmark": "model_cpu", "threads": opts.threads, "config": SMALL,
                      "rows": rows, "prefill_16k_over_4k": growth}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
