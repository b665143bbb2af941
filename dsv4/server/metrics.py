"""Prometheus metrics in the text exposition format (version 0.0.4), no client library.

Counters and histograms are updated by the request handlers on the event loop; gauges are
read from the engine when /metrics is scraped.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                     1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, labelnames
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labelnames)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(str(labels[n]) for n in self.labelnames), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values and not self.labelnames:
            lines.append(f"{self.name} 0")
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labelnames, key)} {_fmt(value)}")
        return lines


class Gauge:
    """A value read at scrape time (a gauge, or a counter the engine keeps)."""

    def __init__(self, name: str, help: str, read: Callable[[], float],
                 kind: str = "gauge") -> None:
        self.name, self.help, self.read, self.kind = name, help, read, kind

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}",
                f"{self.name} {_fmt(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_fmt(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    """Everything /metrics reports. `stats` reads the engine's gauges (AsyncEngine.stats)."""

    def __init__(self, stats: Callable[[], dict[str, float]], prefix: str = "dsv4") -> None:
        p = prefix
        self.requests = Counter(f"{p}_requests_total", "Finished HTTP requests by route and "
                                "status code.", ("route", "status"))
        self.finished = Counter(f"{p}_request_finish_total", "Generated sequences by finish "
                                "reason.", ("reason",))
        self.rejected = Counter(f"{p}_requests_rejected_total", "Requests refused with 429 "
                                "because the queue was full.")
        self.prompt_tokens = Counter(f"{p}_prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter(f"{p}_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time from a request's "
                              "arrival to its first generated token.", LATENCY_BUCKETS_S)
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "Time between consecutive "
                             "tokens of a sequence as the server receives them.",
                             LATENCY_BUCKETS_S)
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "Time from arrival to the "
                             "last token.", LATENCY_BUCKETS_S)
        self.prompt_len = Histogram(f"{p}_request_prompt_tokens", "Prompt length per request.",
                                    TOKEN_BUCKETS)
        self.gen_len = Histogram(f"{p}_request_generation_tokens", "Generated tokens per "
                                 "request.", TOKEN_BUCKETS)
        self._stats = stats
        self._snapshot: dict[str, float] = {}

        def gauge(name: str, key: str, help: str) -> Gauge:
            kind = "counter" if name.endswith("_total") else "gauge"
            return Gauge(f"{p}_{name}", help, lambda: float(self._snapshot.get(key, 0.0)), kind)

        self.gauges = [
            gauge("num_requests_running", "num_requests_running", "Sequences in the running "
                  "batch."),
            gauge("num_requests_waiting", "num_requests_waiting", "Sequences queued for a "
                  "running slot (the queue length)."),
            gauge("num_seqs_accepted", "num_seqs_accepted", "Sequences accepted and not yet "
                  "finished (running + waiting)."),
            gauge("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use "
                  "(0 to 1)."),
            gauge("kv_cache_free_blocks", "kv_cache_free_blocks", "Free KV-cache blocks."),
            gauge("num_preemptions_total", "num_preemptions_total", "Sequences preempted so far "
                  "(cumulative)."),
            gauge("engine_steps_total", "num_steps", "Engine steps run (cumulative)."),
            gauge("spec_decode_num_draft_tokens_total", "spec_decode_draft_tokens_total",
                  "MTP draft tokens verified (cumulative)."),
            gauge("spec_decode_num_accepted_tokens_total", "spec_decode_accepted_tokens_total",
                  "MTP draft tokens that matched the sampled token (cumulative)."),
        ]

    def render(self) -> str:
        self._snapshot = self._stats()
        lines: list[str] = []
        for metric in (self.requests, self.finished, self.rejected, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.itl, self.e2e, self.prompt_len,
                       self.gen_len, *self.gauges):
            lines += metric.render()
        return "\n".join(lines) + "\n"
