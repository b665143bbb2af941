"""Results: the JSON document, the terminal table and the PNG plots.

Result JSON (schema "dsv4.bench.result/1"), top-level keys:
  schema, label, created_utc, command_line (argv list), config (every setting of the run),
  server ({"models": GET /v1/models answer}), client (host, OS, Python, CPUs, dsv4 version),
  metrics (see dsv4.bench.metrics.compute_metrics), requests (one RequestRecord.to_json()
  per request, failures included, with raw per-chunk times), warmup ({num, failed}),
  prediction (optional planner bound, see dsv4.bench.compare).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsv4.bench.records import RequestRecord

SCHEMA = "dsv4.bench.result/1"
SWEEP_SCHEMA = "dsv4.bench.sweep/1"
LATENCIES = (("ttft_ms", "TTFT"), ("ttfc_ms", "TTFC (content)"), ("tpot_ms", "TPOT"),
             ("itl_ms", "ITL"), ("e2el_ms", "E2E latency"))


def client_info() -> dict[str, Any]:
    from dsv4 import __version__

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "dsv4_version": __version__,
    }


def build_result(
    *,
    label: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    records: Sequence[RequestRecord],
    warmup: Sequence[RequestRecord],
    server_models: dict[str, Any],
    command_line: list[str],
    prediction: dict[str, Any] | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "label": label,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line,
        "config": config,
        "server": {"models": server_models},
        "client": client_info(),
        "metrics": metrics,
        "warmup": {"num": len(warmup), "failed": sum(not r.success for r in warmup)},
        "requests": [r.to_json() for r in records],
    }
    if prediction is not None:
        result["prediction"] = prediction
    return result


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def load_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"result file {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{p} is not a `dsv4 bench serve` result (schema {SCHEMA})")
    return data


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) lines in the order of vLLM's printout, plus our additions."""
    m, cfg = result["metrics"], result["config"]
    rows = [
        ("Successful requests", _fmt(m["completed"])),
        ("Failed requests", _fmt(m["failed"])),
        ("Maximum request concurrency", _fmt(cfg.get("concurrency"))),
        ("Request rate configured (RPS)", _fmt(cfg.get("request_rate"))),
        ("Benchmark duration (s)", _fmt(m["duration_s"])),
        ("Total input tokens", _fmt(m["total_input_tokens"])),
        ("Total generated tokens", _fmt(m["total_output_tokens"])),
        ("Output token counts from", ", ".join(f"{k}: {v}" for k, v in
                                              m["output_tokens_source"].items()) or "-"),
        ("Request throughput (req/s)", _fmt(m["request_throughput_rps"])),
        ("Request goodput (req/s)", _fmt(m["request_goodput_rps"])),
        ("Output token throughput (tok/s)", _fmt(m["output_throughput_tok_s"])),
        ("Total token throughput (tok/s)", _fmt(m["total_token_throughput_tok_s"])),
        ("Peak concurrent requests", _fmt(m["max_concurrent_requests"])),
    ]
    for key, name in LATENCIES:
        s = m[key]
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{name} {stat} (ms)", _fmt(s[stat])))
    if "cost" in m:
        c = m["cost"]
        rows.append(("Cost, $ per hour", _fmt(c["usd_per_hour"])))
        rows.append(("$ per 1M output tokens", _fmt(c["usd_per_million_output_tokens"], 4)))
        rows.append(("$ per 1M total tokens", _fmt(c["usd_per_million_total_tokens"], 4)))
    return rows


def print_summary(result: dict[str, Any], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=100)
    table = Table(title=f"Serving benchmark: {result['label']}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary_rows(result):
        table.add_row(name, value)
    console.print(table)
    errors = result["metrics"]["errors"]
    if errors:
        console.print("[bold red]Failed requests by error:[/]")
        for e in errors[:10]:
            console.print(f"  {e['count']} x {e['error']}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(result: dict[str, Any], path: str | Path) -> Path:
    """One panel per latency metric: empirical CDF over the run's requests (ITL over gaps)."""
    import numpy as np

    plt = _pyplot()
    records = [RequestRecord.from_json(r) for r in result["requests"]]
    ok = [r for r in records if r.success]
    series = {
        "TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
        "TPOT": [(r.end_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
                 if r.output_tokens and r.output_tokens > 1],
        "ITL": [gap for r in ok for gap in r.itl_s],
        "E2E latency": [r.end_s for r in ok if r.end_s is not None],
    }
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, values_s) in zip(axes, series.items()):
        if values_s:
            x = np.sort(np.asarray(values_s)) * 1000.0
            ax.plot(x, np.arange(1, x.size + 1) / x.size, drawstyle="steps-post")
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    fig.suptitle(f"Latency CDFs: {result['label']}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_document(results: Sequence[dict[str, Any]], command_line: list[str]) -> dict[str, Any]:
    """Summary of a concurrency sweep: one row per level, the full results alongside."""
    rows = []
    for r in results:
        m = r["metrics"]
        rows.append({
            "concurrency": r["config"]["concurrency"],
            "completed": m["completed"],
            "failed": m["failed"],
            "request_throughput_rps": m["request_throughput_rps"],
            "output_throughput_tok_s": m["output_throughput_tok_s"],
            "total_token_throughput_tok_s": m["total_token_throughput_tok_s"],
            **{f"{key[:-3]}_{stat}_ms": m[key][stat] for key, _ in LATENCIES
               for stat in ("median", "p99")},
        })
    return {"schema": SWEEP_SCHEMA, "command_line": command_line, "levels": rows,
            "runs": list(results)}


def plot_sweep(sweep: dict[str, Any], path: str | Path) -> Path:
    """Throughput and latency (median and p99) against concurrency, log-2 x axis."""
    plt = _pyplot()
    rows = sweep["levels"]
    conc = [row["concurrency"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(conc, [row["output_throughput_tok_s"] for row in rows], "o-", label="output")
    axes[0].plot(conc, [row["total_token_throughput_tok_s"] for row in rows], "s--",
                 label="input + output")
    axes[0].set_ylabel("tokens / s")
    axes[0].set_title("Throughput")
    axes[0].legend()
    for ax, key, title in ((axes[1], "ttft", "TTFT"), (axes[2], "tpot", "TPOT")):
        ax.plot(conc, [row[f"{key}_median_ms"] for row in rows], "o-", label="median")
        ax.plot(conc, [row[f"{key}_p99_ms"] for row in rows], "s--", label="p99")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
