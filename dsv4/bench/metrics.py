"""Serving metrics from request records: pure functions, no I/O.

The definitions are those of `vllm bench serve` (vllm/benchmarks/serve.py, `calculate_metrics`)
so that numbers from this tool mean the same as the ones vLLM and SGLang publish:

- TTFT: time from sending the request to the first streamed chunk that carries generated text.
  (vLLM's client starts the clock at the first chunk with any `choices`; vLLM's server sends its
  role-only chunk together with the first token, so the two agree there, but a server that sends
  the role chunk before prefill would get a near-zero TTFT from vLLM's client and not from ours.)
- E2E latency (E2EL): time from sending to the last chunk that carries `choices`.
- TPOT, per request, excluding the first token: (E2EL - TTFT) / (output_tokens - 1), only for
  requests with more than one output token. For goodput a request with one token has TPOT 0.
- ITL: the gaps between consecutive token-bearing chunks, pooled over all requests (a chunk
  that carries several tokens is one gap, as in vLLM).
- Output tokens of a request: the server's `usage.completion_tokens`; when the server sends no
  usage, a tokenizer count of the generated text. (vLLM falls back to 1 without a tokenizer; we
  fall back to the number of token-bearing chunks, which is exact for servers that stream one
  token per chunk, and say which source was used.)
- Throughputs divide by the benchmark duration (first dispatch to last completion): requests,
  output tokens, and input + output tokens per second, over successful requests only.
- Goodput: successful requests whose TTFT, TPOT and E2EL are all at or under the SLO given,
  per second of benchmark duration.
- Percentiles use linear interpolation between order statistics (numpy's default, as vLLM).

Added here: time to first *content* token (TTFC), which excludes `reasoning_content`, so a
thinking model's answer latency is visible; cost per million tokens from a device-hour price.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from dsv4.bench.records import RequestRecord

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms", "ttfc_ms")


def summarize_ms(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """mean / median / std / p90 / p99 of values given in seconds, reported in milliseconds."""
    if len(values_s) == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "p90": None, "p99": None}
    arr_ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "n": int(arr_ms.size),
        "mean": float(arr_ms.mean()),
        "median": float(np.median(arr_ms)),
        "std": float(arr_ms.std()),
        "p90": float(np.percentile(arr_ms, 90)),
        "p99": float(np.percentile(arr_ms, 99)),
    }


def output_token_count(
    record: RequestRecord, count_tokens: Callable[[str], int] | None = None
) -> tuple[int, str]:
    """Output tokens of one request and where the number came from."""
    if record.usage_completion_tokens is not None:
        return int(record.usage_completion_tokens), "usage"
    if count_tokens is not None:
        return count_tokens(record.reasoning_text + record.output_text), "tokenizer"
    return len(record.token_times_s), "chunks"


def tpot_s(record: RequestRecord) -> float | None:
    """(E2EL - TTFT) / (output_tokens - 1); None when the request has one token or fewer."""
    n = record.output_tokens
    if n is None or n <= 1 or record.end_s is None or record.ttft_s is None:
        return None
    return (record.end_s - record.ttft_s) / (n - 1)


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft_ms=500,tpot_ms=50' -> {'ttft_ms': 500.0, 'tpot_ms': 50.0}.

    vLLM's `--goodput` spelling, 'ttft:500 tpot:50' (milliseconds), is accepted as well.
    """
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.replace(",", " ").split():
        if ":" in part and "=" not in part:  # vLLM style: name:ms
            name, _, value = part.partition(":")
            part = f"{name}_ms={value}"
        key, sep, value = part.partition("=")
        if not sep or key not in SLO_KEYS:
            raise ValueError(
                f"--slo entry {part!r} is not KEY=MS with KEY one of {', '.join(SLO_KEYS)}; "
                "write e.g. --slo ttft_ms=500,tpot_ms=50"
            )
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--slo value {value!r} for {key} is not a number") from None
        if slo[key] <= 0:
            raise ValueError(f"--slo {key} must be positive, got {value}")
    return slo


def meets_slo(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """vLLM's rule: every metric at or under its bound; a 1-token request has TPOT 0."""
    values_s = {
        "ttft_ms": record.ttft_s,
        "tpot_ms": tpot_s(record) or 0.0,
        "e2el_ms": record.end_s,
        "ttfc_ms": record.ttfc_s,
    }
    for key, bound_ms in slo_ms.items():
        value = values_s[key]
        if value is None or value * 1000.0 > bound_ms:
            return False
    return True


def max_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight at once, over half-open [send, end) intervals."""
    events: list[tuple[float, int]] = []
    for r in records:
        if r.success and r.end_s is not None:
            events.append((r.send_time_s, 1))
            events.append((r.send_time_s + r.end_s, -1))
    events.sort()  # at equal times -1 sorts first: an end frees its slot before a start
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def cost_per_million_tokens(
    tokens_per_s: float, price_per_device_hour: float, num_devices: int
) -> float | None:
    """Dollars per 1e6 tokens when the deployment costs `price * devices` per hour."""
    if tokens_per_s <= 0:
        return None
    dollars_per_s = price_per_device_hour * num_devices / 3600.0
    return dollars_per_s / tokens_per_s * 1e6


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    slo_ms: dict[str, float] | None = None,
    count_tokens: Callable[[str], int] | None = None,
    price_per_device_hour: float | None = None,
    num_devices: int = 1,
) -> dict[str, Any]:
    """All run-level metrics. Also fills `output_tokens(_source)` on each record."""
    if duration_s <= 0:
        raise ValueError(f"benchmark duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]

    ttfts: list[float] = []
    ttfcs: list[float] = []
    tpots: list[float] = []
    itls: list[float] = []
    e2els: list[float] = []
    total_input = total_output = 0
    sources: Counter[str] = Counter()
    for r in ok:
        r.output_tokens, r.output_tokens_source = output_token_count(r, count_tokens)
        sources[r.output_tokens_source] += 1
        total_output += r.output_tokens
        prompt = r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.prompt_len
        total_input += prompt or 0
        if r.ttft_s is not None:
            ttfts.append(r.ttft_s)
        if r.ttfc_s is not None:
            ttfcs.append(r.ttfc_s)
        if (t := tpot_s(r)) is not None:
            tpots.append(t)
        itls.extend(r.itl_s)
        if r.end_s is not None:
            e2els.append(r.end_s)

    slo_ms = slo_ms or {}
    num_good = sum(meets_slo(r, slo_ms) for r in ok) if slo_ms else None
    errors = Counter(r.error or "unknown error" for r in failed)

    metrics: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "errors": [{"error": e, "count": n} for e, n in errors.most_common()],
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "output_tokens_source": dict(sources),
        "request_throughput_rps": len(ok) / duration_s,
        "request_goodput_rps": None if num_good is None else num_good / duration_s,
        "num_good_requests": num_good,
        "slo_ms": slo_ms,
        "output_throughput_tok_s": total_output / duration_s,
        "total_token_throughput_tok_s": (total_input + total_output) / duration_s,
        "max_concurrent_requests": max_concurrency(ok),
        "ttft_ms": summarize_ms(ttfts),
        "ttfc_ms": summarize_ms(ttfcs),
        "tpot_ms": summarize_ms(tpots),
        "itl_ms": summarize_ms(itls),
        "e2el_ms": summarize_ms(e2els),
    }
    if price_per_device_hour is not None:
        if price_per_device_hour < 0 or num_devices < 1:
            raise ValueError("--price-per-hour must be >= 0 and --devices >= 1")
        metrics["cost"] = {
            "price_per_device_hour_usd": price_per_device_hour,
            "num_devices": num_devices,
            "usd_per_hour": price_per_device_hour * num_devices,
            "usd_per_million_output_tokens": cost_per_million_tokens(
                metrics["output_throughput_tok_s"], price_per_device_hour, num_devices
            ),
            "usd_per_million_total_tokens": cost_per_million_tokens(
                metrics["total_token_throughput_tok_s"], price_per_device_hour, num_devices
            ),
        }
    return metrics
