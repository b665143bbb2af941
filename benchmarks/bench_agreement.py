"""Agreement check: dsv4's bench and NVIDIA's aiperf measure the same server and workload.

Runs `aiperf profile` and then `dsv4 bench serve` against one OpenAI-compatible endpoint with
the same load: dsv4 replays what aiperf sent as a trace (each request's prompt and the moment
aiperf sent it, under fixed concurrency or Poisson arrivals), with the same output length
(`max_tokens`), streaming with usage. Then it prints the medians of TTFT and TPOT and the
output token throughput side by side, a table first and one JSON line last. The tools agree
when every relative difference is within --tolerance (10% by default).

aiperf's "inter_token_latency" is per request (latency - TTFT) / (output tokens - 1), the same
definition as vLLM's TPOT that dsv4 reports, so the two medians are directly comparable.

aiperf has heavy dependencies; keep it in its own virtual environment:
    python -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf
    python benchmarks/bench_agreement.py --base-url http://127.0.0.1:8000 \\
        --tokenizer PATH/TO/TOKENIZER_DIR --aiperf /tmp/aiperf-venv/bin/aiperf
aiperf needs a local HuggingFace tokenizer folder (tokenizer.json + tokenizer_config.json)
because this machine cannot download one; dsv4's bench reads the tokenizer.json in it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_aiperf(args: argparse.Namespace, out_dir: Path) -> dict:
    cmd = [
        args.aiperf, "profile", "--model", args.model, "--url", args.base_url,
        "--endpoint-type", "chat", "--streaming", "--tokenizer", args.tokenizer,
        *(["--request-rate", str(args.request_rate), "--arrival-pattern", "poisson"]
          if args.request_rate else ["--concurrency", str(args.concurrency)]),
        "--request-count", str(args.num_prompts),
        "--prompt-input-tokens-mean", str(args.input_len), "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(args.output_len),
        "--prompt-output-tokens-stddev", "0",
        "--use-server-token-count", "--use-legacy-max-tokens",
        "--warmup-request-count", str(args.num_warmups),
        "--output-artifact-dir", str(out_dir), "--no-server-metrics", "--no-gpu-telemetry",
        "--no-auto-plot", "--random-seed", str(args.seed),
    ]
    if args.ignore_eos:
        cmd += ["--extra-inputs", "ignore_eos:true"]
    log = out_dir / "aiperf.stdout.txt"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    summary = out_dir / "profile_export_aiperf.json"
    if rc != 0 or not summary.is_file():
        raise SystemExit(f"aiperf failed (rc={rc}); see {log}")
    d = json.loads(summary.read_text())
    return {
        "ttft_median_ms": d["time_to_first_token"]["p50"],
        "tpot_median_ms": d["inter_token_latency"]["p50"],
        "output_throughput_tok_s": d["output_token_throughput"]["avg"],
        "completed": d.get("request_count", {}).get("avg"),
        "command": cmd,
    }


def aiperf_trace_as_jsonl(aiperf_dir: Path, out: Path) -> Path:
    """What aiperf sent, as a trace: each profiled request's chat messages and the time aiperf
    sent it (its profile_export.jsonl), one JSON line each. dsv4's bench replays it, so both
    tools see the same prompts arriving at the same moments: only the measuring differs."""
    sessions = json.loads((aiperf_dir / "inputs.json").read_text())["data"]
    messages = {s["session_id"]: s["payloads"][0]["messages"] for s in sessions}
    records = [json.loads(line) for line in open(aiperf_dir / "profile_export.jsonl")]
    sent = sorted((r["metadata"]["request_start_ns"], r["metadata"]["conversation_id"])
                  for r in records if r["metadata"].get("benchmark_phase") == "profiling")
    with open(out, "w") as f:
        for start_ns, session in sent:
            stamp_ms = (start_ns - sent[0][0]) / 1e6
            f.write(json.dumps({"messages": messages[session], "timestamp": stamp_ms}) + "\n")
    return out


def run_dsv4(args: argparse.Namespace, out_dir: Path, prompts: Path) -> dict:
    result_file = out_dir / "dsv4.json"
    cmd = [
        sys.executable, "-m", "dsv4.cli", "bench", "serve", "--base-url", args.base_url,
        "--model", args.model, "--dataset", "jsonl", "--dataset-path", str(prompts),
        "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        # the trace sets when each request is sent; under fixed concurrency the same limit
        # holds it back while all slots are busy, as aiperf did
        *([] if args.request_rate else ["--concurrency", str(args.concurrency)]),
        "--num-warmups", str(args.num_warmups),
        "--seed", str(args.seed), "--result-file", str(result_file), "--disable-tqdm",
        "--no-plot",
    ]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    log = out_dir / "dsv4.stdout.txt"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0 or not result_file.is_file():
        raise SystemExit(f"dsv4 bench failed (rc={rc}); see {log}")
    m = json.loads(result_file.read_text())["metrics"]
    return {
        "ttft_median_ms": m["ttft_ms"]["median"],
        "tpot_median_ms": m["tpot_ms"]["median"],
        "output_throughput_tok_s": m["output_throughput_tok_s"],
        "completed": m["completed"],
        "command": cmd,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--tokenizer", required=True,
                   help="local HuggingFace tokenizer folder (aiperf needs one)")
    p.add_argument("--aiperf", default=shutil.which("aiperf") or "aiperf")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals at this many requests/s instead of fixed concurrency")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="both tools ask for exactly --output-len tokens")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--out-dir", default=None, help="keep artifacts here (default: temp)")
    args = p.parse_args()

    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-agreement-"))
    aiperf = run_aiperf(args, out / "aiperf")
    dsv4 = run_dsv4(args, out, aiperf_trace_as_jsonl(out / "aiperf", out / "trace.jsonl"))

    rows = []
    print(f"{'metric':<28}{'dsv4 bench':>14}{'aiperf':>14}{'diff':>10}")
    for key in ("ttft_median_ms", "tpot_median_ms", "output_throughput_tok_s"):
        a, b = dsv4[key], aiperf[key]
        diff = (a - b) / b
        rows.append({"metric": key, "dsv4": a, "aiperf": b, "rel_diff": diff,
                     "agree": abs(diff) <= args.tolerance})
        print(f"{key:<28}{a:>14.2f}{b:>14.2f}{diff:>+10.1%}")
    agree = all(r["agree"] for r in rows)
    print(f"completed: dsv4 {dsv4['completed']}, aiperf {aiperf['completed']}; "
          f"agree within {args.tolerance:.0%}: {agree}; artifacts in {out}")
    print(json.dumps({"benchmark": "bench_agreement", "base_url": args.base_url,
                      "model": args.model, "concurrency": args.concurrency,
                      "request_rate": args.request_rate,
                      "num_prompts": args.num_prompts, "input_len": args.input_len,
                      "output_len": args.output_len, "tolerance": args.tolerance,
                      "agree": agree, "rows": rows}))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
