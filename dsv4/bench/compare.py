"""Side-by-side report of two or more benchmark runs (e.g. V4-Flash on 8x H100 vs 8x Ascend).

The first run is the baseline A. For every other run B:
- throughput efficiency B / A (request, output, total token throughput): above 1 means B is
  faster;
- latency ratio B / A at mean, median, p90 and p99 of TTFT, TTFC, TPOT, ITL and E2E latency:
  below 1 means B is quicker;
- cost per million output / total tokens and its change relative to A, when both runs were
  given a price;
- when a run carries the planner's prediction of its hardware bound, how far the run is from
  it: measured throughput / bound throughput and bound TPOT / measured TPOT (1.0 = at the
  bound).

A prediction is a JSON object with any of `output_throughput_tok_s` (the most output tokens per
second the hardware could give for this workload), `tpot_ms` and `ttft_ms` (the least latency),
and optional `source`. It is stored in the result under "prediction" (`bench serve
--prediction FILE`) or given here with `--prediction LABEL=FILE`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsv4.bench.report import LATENCIES

THROUGHPUTS = (("request_throughput_rps", "Request throughput (req/s)"),
               ("output_throughput_tok_s", "Output throughput (tok/s)"),
               ("total_token_throughput_tok_s", "Total token throughput (tok/s)"))
STATS = ("mean", "median", "p90", "p99")
PREDICTION_KEYS = ("output_throughput_tok_s", "tpot_ms", "ttft_ms")


def _ratio(b: float | None, a: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a


def from_planner(plan: dict[str, Any]) -> dict[str, Any]:
    """The bounds of a `dsv4 plan --json` answer in the keys compare reads: the deployment's
    best output throughput (per device x devices), lowest TPOT and TTFT."""
    return {
        "output_throughput_tok_s": plan["decode_tokens_per_s_per_device"] * plan["devices"],
        "tpot_ms": plan["tpot_ms_lower_bound"],
        "ttft_ms": plan["ttft_ms_lower_bound"],
        "source": f"dsv4 plan: {plan.get('model')} on {plan.get('devices')}x "
                  f"{plan.get('hardware')}, {plan.get('input_len')} in / "
                  f"{plan.get('output_len')} out",
    }


def load_prediction(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prediction file {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"prediction file {p} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "tpot_ms_lower_bound" in data:
        data = from_planner(data)
    if not isinstance(data, dict) or not any(k in data for k in PREDICTION_KEYS):
        raise ValueError(
            f"prediction file {p} needs at least one of {', '.join(PREDICTION_KEYS)}"
        )
    return data


def run_labels(results: Sequence[dict[str, Any]]) -> list[str]:
    """Each run's label, made unique with its position when two runs share one."""
    labels = [str(r.get("label") or f"run{i}") for i, r in enumerate(results)]
    return [f"{lab} [{i}]" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def compare_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Numbers of the comparison; `render_markdown` turns them into the report."""
    if len(results) < 2:
        raise ValueError("compare needs at least two result files")
    labels = run_labels(results)
    base = results[0]["metrics"]
    runs = []
    for label, res in zip(labels, results):
        m = res["metrics"]
        run: dict[str, Any] = {
            "label": label,
            "config": {k: res["config"].get(k) for k in
                       ("base_url", "model", "dataset", "concurrency", "request_rate",
                        "input_len", "output_len")},
            "completed": m["completed"],
            "failed": m["failed"],
            "throughput": {k: m[k] for k, _ in THROUGHPUTS},
            "throughput_ratio": {k: _ratio(m[k], base[k]) for k, _ in THROUGHPUTS},
            "latency_ms": {k: {s: m[k][s] for s in STATS} for k, _ in LATENCIES},
            "latency_ratio": {k: {s: _ratio(m[k][s], base[k][s]) for s in STATS}
                              for k, _ in LATENCIES},
        }
        if "cost" in m and "cost" in base:
            run["cost"] = {}
            for key in ("usd_per_million_output_tokens", "usd_per_million_total_tokens"):
                value, ref = m["cost"][key], base["cost"][key]
                ratio = _ratio(value, ref)
                run["cost"][key] = value
                run["cost"][key.replace("usd_", "change_pct_")] = (
                    None if ratio is None else (ratio - 1.0) * 100.0
                )
        elif "cost" in m:
            run["cost"] = {k: m["cost"][k] for k in ("usd_per_million_output_tokens",
                                                     "usd_per_million_total_tokens")}
        pred = res.get("prediction")
        if pred:
            bound = {"source": pred.get("source")}
            if pred.get("output_throughput_tok_s"):
                bound["throughput_fraction_of_bound"] = (
                    m["output_throughput_tok_s"] / pred["output_throughput_tok_s"]
                )
            for key in ("tpot_ms", "ttft_ms"):
                measured = m[key]["median"]
                if pred.get(key) and measured:
                    bound[f"{key[:-3]}_bound_over_measured"] = pred[key] / measured
            run["bound"] = {"prediction": pred, **bound}
        runs.append(run)
    return {"baseline": labels[0], "runs": runs, "workload_differences": _differences(results)}


WORKLOAD_KEYS = ("endpoint", "dataset", "dataset_path", "input_len", "output_len", "range_ratio",
                 "num_prompts", "duration_s", "concurrency", "request_rate", "burstiness",
                 "ignore_eos", "seed")


def _differences(results: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Workload settings that are not the same in every run: a hardware comparison is only fair
    when these match, so the report says so loudly."""
    diffs = {}
    for key in WORKLOAD_KEYS:
        values = [r["config"].get(key) for r in results]
        if any(v != values[0] for v in values):
            diffs[key] = values
    return diffs


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def render_markdown(comparison: dict[str, Any]) -> str:
    runs = comparison["runs"]
    base_label = comparison["baseline"]
    others = runs[1:]
    lines = [f"# Benchmark comparison (baseline A = {base_label})", ""]

    diffs = comparison.get("workload_differences") or {}
    if diffs:
        lines += ["> **Warning: the runs did not use the same workload**, so the ratios mix "
                  "hardware with workload:", ">"]
        for key, values in diffs.items():
            lines.append(f"> - {key}: " + ", ".join(str(v) for v in values))
        lines.append("")

    head = "| | " + " | ".join(r["label"] for r in runs) + " |"
    sep = "|---|" + "---:|" * len(runs)
    lines += ["## Runs", "", head, sep]
    for key in ("base_url", "model", "dataset", "concurrency", "request_rate", "input_len",
                "output_len"):
        lines.append(f"| {key} | " + " | ".join(str(r["config"][key]) for r in runs) + " |")
    lines.append("| completed / failed | "
                 + " | ".join(f"{r['completed']} / {r['failed']}" for r in runs) + " |")

    ratio_head = "".join(f" {r['label']} / A |" for r in others)
    lines += ["", "## Throughput (efficiency = B / A, higher is better)", "",
              head + ratio_head, sep + "---:|" * len(others)]
    for key, name in THROUGHPUTS:
        cells = " | ".join(_f(r["throughput"][key]) for r in runs)
        ratios = "".join(f" {_x(r['throughput_ratio'][key])} |" for r in others)
        lines.append(f"| {name} | {cells} |{ratios}")

    lines += ["", "## Latency (ratio = B / A, lower is better)", "",
              head + ratio_head, sep + "---:|" * len(others)]
    for key, name in LATENCIES:
        for stat in STATS:
            cells = " | ".join(_f(r["latency_ms"][key][stat]) for r in runs)
            ratios = "".join(f" {_x(r['latency_ratio'][key][stat])} |" for r in others)
            lines.append(f"| {name} {stat} (ms) | {cells} |{ratios}")

    if any("cost" in r for r in runs):
        lines += ["", "## Cost per million tokens", "", head, sep]
        for key, name in (("usd_per_million_output_tokens", "$ / 1M output tokens"),
                          ("usd_per_million_total_tokens", "$ / 1M total tokens")):
            lines.append(f"| {name} | " + " | ".join(
                _f(r.get("cost", {}).get(key), 4) for r in runs) + " |")
            change = key.replace("usd_", "change_pct_")
            lines.append("| change vs A (%) | " + " | ".join(
                _f(r.get("cost", {}).get(change), 1) for r in runs) + " |")

    if any("bound" in r for r in runs):
        lines += ["", "## Distance from the hardware bound (planner prediction; 1.0 = at bound)",
                  "", head, sep]
        for key, name in (("throughput_fraction_of_bound", "output throughput / bound"),
                          ("tpot_bound_over_measured", "bound TPOT / median TPOT"),
                          ("ttft_bound_over_measured", "bound TTFT / median TTFT")):
            lines.append(f"| {name} | " + " | ".join(
                _f(r.get("bound", {}).get(key), 3) for r in runs) + " |")
    lines.append("")
    return "\n".join(lines)


def plot_comparison(comparison: dict[str, Any], path: str | Path) -> Path:
    """Bars: output throughput per run, and TTFT / TPOT / E2E at median and p99."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt
    import numpy as np

    runs = comparison["runs"]
    labels = ["\n".join(textwrap.wrap(r["label"], 18)) for r in runs]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4))
    axes[0].bar(labels, [r["throughput"]["output_throughput_tok_s"] for r in runs],
                color=[f"C{i}" for i in range(len(runs))])
    axes[0].set_title("Output throughput (tok/s)")
    width = 0.8 / len(runs)
    for ax, key, title in ((axes[1], "ttft_ms", "TTFT (ms)"), (axes[2], "tpot_ms", "TPOT (ms)"),
                           (axes[3], "e2el_ms", "E2E latency (ms)")):
        x = np.arange(len(STATS))
        for i, r in enumerate(runs):
            vals = [r["latency_ms"][key][s] or 0.0 for s in STATS]
            ax.bar(x + i * width, vals, width, label=r["label"])
        ax.set_xticks(x + width * (len(runs) - 1) / 2, STATS)
        ax.set_title(title)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Baseline A = {comparison['baseline']}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
