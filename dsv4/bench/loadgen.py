"""Load shapes: fixed concurrency, and Poisson / gamma arrivals with burstiness.

As in `vllm bench serve`: inter-arrival gaps are gamma-distributed with shape = burstiness and
scale = 1 / (rate * burstiness), so the mean gap is 1/rate for any burstiness; burstiness 1 is
a Poisson process, below 1 burstier (more variance), above 1 more regular (CV^2 = 1/burstiness).
With a request count, the cumulative arrival times are rescaled so the last one lands at exactly
num/rate (vLLM does this to stop seed-to-seed drift of the offered load). A concurrency limit
applies on top: an arrived request waits for a free slot. Samples that carry their own send
times (a replayed trace) are sent at those times instead.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dsv4.bench.datasets import SampleRequest
from dsv4.bench.records import RequestRecord

# (sample, index, bench_start_s) -> record; the client's send_request with its endpoint bound
SendFn = Callable[[SampleRequest, int, float], Awaitable[RequestRecord]]


def gamma_intervals_s(
    num: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> np.ndarray:
    """`num` inter-arrival gaps in seconds; zeros for an infinite rate."""
    if not request_rate > 0:  # NaN too
        raise ValueError(f"--request-rate must be positive (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(num)
    if math.isinf(burstiness):
        return np.full(num, 1.0 / request_rate)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)


def arrival_times_s(
    num: int, request_rate: float, burstiness: float = 1.0, seed: int = 0,
    normalize: bool = True,
) -> np.ndarray:
    """Send time of each request relative to the start, the first at its first gap."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(gamma_intervals_s(num, request_rate, burstiness, rng))
    if normalize and num and times[-1] > 0:
        times *= (num / request_rate) / times[-1]
    return times


@dataclass
class LoadShape:
    concurrency: int | None = None  # None: unlimited
    request_rate: float = math.inf
    burstiness: float = 1.0
    num_prompts: int | None = None  # exactly this many requests...
    duration_s: float | None = None  # ...or keep sending until this much time has passed
    num_warmups: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.num_prompts is None) == (self.duration_s is None):
            raise ValueError("give exactly one of --num-prompts and --duration")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if self.duration_s is not None and not 0 < self.duration_s < math.inf:
            raise ValueError(f"--duration must be a positive number of seconds, got "
                             f"{self.duration_s}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        if math.isinf(self.request_rate) and self.concurrency is None and self.duration_s:
            raise ValueError(
                "--duration with an infinite --request-rate needs a --concurrency limit, "
                "otherwise requests would be sent without bound"
            )
        gamma_intervals_s(0, self.request_rate, self.burstiness, np.random.default_rng(0))


@dataclass
class LoadResult:
    records: list[RequestRecord]
    duration_s: float  # first dispatch to last completion, warm-up excluded
    warmup_records: list[RequestRecord]


async def run_load(
    samples: Sequence[SampleRequest],
    send: SendFn,
    shape: LoadShape,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Warm up, then send `samples` in the given shape; returns every record, failures too."""
    if not samples:
        raise ValueError("no prompts to send")
    sem = asyncio.Semaphore(shape.concurrency) if shape.concurrency else None

    async def limited(sample: SampleRequest, index: int, start_s: float) -> RequestRecord:
        if sem is None:
            record = await send(sample, index, start_s)
        else:
            async with sem:
                record = await send(sample, index, start_s)
        if on_done is not None and index >= 0:
            on_done(record)
        return record

    # Warm-up: the first prompt, at the benchmark's concurrency, results kept apart.
    warm_start = time.perf_counter()
    warmup = await asyncio.gather(
        *(limited(samples[0], -1 - i, warm_start) for i in range(shape.num_warmups))
    )

    start_s = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    if shape.num_prompts is not None:
        batch = samples[: shape.num_prompts]
        if len(batch) == shape.num_prompts and all(s.send_time_s is not None for s in batch):
            times = [s.send_time_s for s in batch]  # a trace: its own send times
        else:
            times = arrival_times_s(shape.num_prompts, shape.request_rate, shape.burstiness,
                                    shape.seed)
        for i, t in enumerate(times):
            delay = start_s + float(t) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(samples[i % len(samples)], i, start_s)))
    else:
        assert shape.duration_s is not None
        rng = np.random.default_rng(shape.seed)
        t_next = 0.0
        i = 0
        while True:
            if math.isinf(shape.request_rate):
                # closed loop at the concurrency limit: launch when a slot is free
                assert sem is not None
                await sem.acquire()
                sem.release()
            else:
                t_next += float(gamma_intervals_s(1, shape.request_rate, shape.burstiness,
                                                  rng)[0])
                delay = start_s + t_next - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if time.perf_counter() - start_s >= shape.duration_s:
                break
            tasks.append(asyncio.create_task(limited(samples[i % len(samples)], i, start_s)))
            i += 1
            await asyncio.sleep(0)  # let the task take its slot before checking again
    records = list(await asyncio.gather(*tasks))
    return LoadResult(records, time.perf_counter() - start_s, list(warmup))
