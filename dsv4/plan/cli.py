"""`dsv4 plan`: does a model fit on some hardware, how fast can it be at best, what does a
million tokens cost. `dsv4 plan compare --hardware A --hardware B` puts deployments side by
side; `--sweep concurrency|context --output chart.png` charts how the bounds move."""

from __future__ import annotations

import argparse
import json

from dsv4.plan.hardware import get_hardware
from dsv4.plan.models import ModelSpec
from dsv4.plan.predict import Deployment, predict

SWEEPS = {"concurrency": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
          "context": [4096, 16384, 65536, 131072, 262144, 524288, 1048576]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["compare"], default=None,
                        help="compare: one column per --hardware")
    parser.add_argument("--model", default="v4-flash",
                        help="v4-flash, v4-pro, v3.2, v3, or a config.json path")
    parser.add_argument("--hardware", action="append", default=None,
                        help="hardware id (repeat for compare); default h200")
    parser.add_argument("--hardware-file", help="JSON file of extra hardware entries")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel group size")
    parser.add_argument("--ep", type=int, default=None, help="expert parallel (default: devices)")
    parser.add_argument("--context", type=int, default=1_048_576, help="tokens per sequence")
    parser.add_argument("--input-len", type=int, default=4096)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="sequences decoded together (default: as many as fit)")
    parser.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="fp8")
    parser.add_argument("--indexer-dtype", choices=["bf16", "fp4"], default="fp4")
    parser.add_argument("--storage", choices=["fp4-fp8", "fp8", "int8", "bf16"], default=None,
                        help="weight storage plan (default: the hardware's native one)")
    parser.add_argument("--price-per-hour", type=float, default=None,
                        help="USD per device-hour (default: the catalogue's)")
    parser.add_argument("--utilization", type=float, default=0.5,
                        help="share of the bound reached in service, for the cost figures")
    parser.add_argument("--sweep", choices=list(SWEEPS), help="chart the bounds over a range")
    parser.add_argument("--output", default="plan.png", help="PNG path for --sweep")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _deployment(args: argparse.Namespace, hw_id: str, **overrides) -> Deployment:
    model = ModelSpec.from_name(args.model)
    kv, idx = args.kv_dtype, args.indexer_dtype
    if model.family != "v4":  # V3-family caches: fp8 latent, fp8 indexer keys
        idx = "fp8" if idx == "fp4" else idx
    fields = dict(model=model, hardware=get_hardware(hw_id, args.hardware_file),
                  devices=args.devices, tp=args.tp, ep=args.ep, context=args.context,
                  input_len=args.input_len, output_len=args.output_len,
                  concurrency=args.concurrency, kv_dtype=kv, indexer_dtype=idx,
                  storage=args.storage, price_per_hour_usd=args.price_per_hour,
                  utilization=args.utilization)
    fields.update(overrides)
    return Deployment(**fields)


ROWS = [  # (label, key, format)
    ("fits", "fits", "{}"),
    ("storage plan", "storage_plan", "{}"),
    ("weights (GB)", "weight_bytes", "{:.1f}", 1e-9),
    ("KV per token (B)", "kv_cache_bytes_per_token", "{:.0f}"),
    ("KV per sequence (GiB)", "kv_cache_bytes_per_sequence", "{:.2f}", 2**-30),
    ("max concurrent sequences", "max_concurrent_sequences", "{}"),
    ("concurrency used", "concurrency", "{}"),
    ("TPOT lower bound (ms)", "tpot_ms_lower_bound", "{:.2f}"),
    ("TTFT lower bound (ms)", "ttft_ms_lower_bound", "{:.1f}"),
    ("decode tok/s per device (max)", "decode_tokens_per_s_per_device", "{:.0f}"),
    ("prefill tok/s per device (max)", "prefill_tokens_per_s_per_device", "{:.0f}"),
    ("decode bound", "decode_bound", "{}"),
    ("price per device-hour (USD)", "price_per_hour_usd", "{:.2f}"),
    ("USD per 1M output tokens", "cost_per_million_output_tokens", "{:.3f}"),
    ("USD per 1M input tokens", "cost_per_million_input_tokens", "{:.4f}"),
]


def _cell(result: dict, row: tuple) -> str:
    _, key, fmt, *scale = row
    if key not in result:
        return "-"
    value = result[key]
    if scale:
        value = value * scale[0]
    return fmt.format(value)


def format_table(results: list[dict]) -> str:
    headers = [f"{r['devices']} x {r['hardware']}" for r in results]
    width = max(len(row[0]) for row in ROWS)
    cols = [max(len(h), 12) for h in headers]
    lines = [" " * width + "  " + "  ".join(h.rjust(c) for h, c in zip(headers, cols))]
    for row in ROWS:
        cells = [_cell(r, row).rjust(c) for r, c in zip(results, cols)]
        lines.append(row[0].ljust(width) + "  " + "  ".join(cells))
    for r in results:
        for reason in r["why_not"]:
            lines.append(f"! {r['hardware']}: {reason}")
    return "\n".join(lines)


def compare_ratios(base: dict, other: dict) -> dict:
    """How `other` compares with `base` (the first --hardware): >1 means more."""
    def ratio(key):
        a, b = base.get(key), other.get(key)
        return b / a if a and b else None

    return {
        "hardware": other["hardware"], "versus": base["hardware"],
        "decode_throughput_per_device": ratio("decode_tokens_per_s_per_device"),
        "prefill_throughput_per_device": ratio("prefill_tokens_per_s_per_device"),
        "tpot_lower_bound": ratio("tpot_ms_lower_bound"),
        "max_concurrent_sequences": ratio("max_concurrent_sequences"),
        "cost_per_million_output_tokens": ratio("cost_per_million_output_tokens"),
    }


def _sweep(args: argparse.Namespace, hw_ids: list[str]) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = args.sweep
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    for hw_id in hw_ids:
        xs, tps, tpot = [], [], []
        for value in SWEEPS[key]:
            if key == "context" and value < args.input_len + args.output_len:
                continue  # the request would not fit a sequence of this length
            r = predict(_deployment(args, hw_id, **{key: value}))
            rows.append(r)
            if r["fits"] and r["concurrency"]:
                xs.append(value)
                tps.append(r["decode_tokens_per_s_per_device"])
                tpot.append(r["tpot_ms_lower_bound"])
        label = f"{args.devices} x {hw_id}"
        ax1.plot(xs, tps, marker="o", label=label)
        ax2.plot(xs, tpot, marker="o", label=label)
    for ax, ylabel in ((ax1, "decode tokens/s per device (upper bound)"),
                       (ax2, "TPOT ms (lower bound)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(key)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.model}: roofline bounds against {key}")
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    return rows


def run(args: argparse.Namespace) -> int:
    hw_ids = args.hardware or (["h100", "ascend-950pr"] if args.action else ["h200"])
    if args.action == "compare" and len(hw_ids) < 2:
        raise ValueError("plan compare needs at least two --hardware")
    if args.sweep:
        rows = _sweep(args, hw_ids)
        if args.json:
            print(json.dumps({"sweep": args.sweep, "output": args.output, "rows": rows}))
        else:
            print(f"wrote {args.output} ({len(rows)} points)")
        return 0
    results = [predict(_deployment(args, hw)) for hw in hw_ids]
    comparisons = [compare_ratios(results[0], r) for r in results[1:]]
    if args.json:
        out = results[0] if len(results) == 1 and not args.action else \
            {"results": results, "comparisons": comparisons}
        print(json.dumps(out, indent=2))
        return 0
    spec = results[0]
    print(f"{args.model}: {spec['total_params'] / 1e9:.0f}B parameters, "
          f"{spec['active_params'] / 1e9:.1f}B activated; context {args.context}, "
          f"KV {args.kv_dtype} + indexer {results[0]['indexer_dtype']}; "
          f"bounds at peak hardware figures, cost at {args.utilization:.0%} of the bound")
    print(format_table(results))
    for c in comparisons:
        parts = [f"{k.replace('_', ' ')} {v:.2f}x" for k, v in c.items()
                 if isinstance(v, float)]
        print(f"{c['hardware']} vs {c['versus']}: " + ", ".join(parts))
    return 0
