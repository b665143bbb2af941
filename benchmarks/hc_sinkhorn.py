"""Sinkhorn normalisation of the hyper-connection mixes, dsv4's against the textbook loop, in
the same process.

Training (forward + backward, 1,000 tokens: one micro-batch of `dsv4 train`): dsv4's
closed-form backward against autograd through the plain torch loop. Inference (forward only,
1 / 32 / 1,000 tokens: a decode step, a batch of decodes, a prefill): dsv4's call against
the plain torch loop. 4 x 4 matrices and 20 iterations, as in V4. Prints a table, then one
JSON line.

    python benchmarks/hc_sinkhorn.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsv4.model.hyper import sinkhorn

ITERS, EPS = 20, 1e-6


def plain_sinkhorn(c: torch.Tensor) -> torch.Tensor:
    c = c / (c.sum(-2, keepdim=True) + EPS)
    for _ in range(ITERS - 1):
        c = c / (c.sum(-1, keepdim=True) + EPS)
        c = c / (c.sum(-2, keepdim=True) + EPS)
    return c


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(impl, comb: torch.Tensor, upstream: torch.Tensor):
    def run():
        leaf = comb.clone().requires_grad_()
        (impl(leaf) * upstream).sum().backward()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    opts = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    ours = lambda c: sinkhorn(c, ITERS, EPS)  # noqa: E731

    def comb(tokens: int) -> torch.Tensor:
        return torch.softmax(torch.randn(1, tokens, 4, 4, generator=g) * 3, dim=-1) + EPS

    rows = {}
    c, upstream = comb(1000), torch.randn(1, 1000, 4, 4, generator=g)
    rows["train, 1000 tokens"] = [seconds(train_step(impl, c, upstream), opts.repeats)
                                  for impl in (plain_sinkhorn, ours)]
    with torch.inference_mode():
        for tokens in (1, 32, 1000):
            c = comb(tokens)
            rows[f"infer, {tokens} tokens"] = [seconds(lambda i=impl, c=c: i(c), opts.repeats)
                                               for impl in (plain_sinkhorn, ours)]
    print(f"{'':<22}{'plain ms':>10}{'dsv4 ms':>10}{'speed-up':>10}")
    for name, (plain, dsv4) in rows.items():
        print(f"{name:<22}{plain * 1e3:>10.2f}{dsv4 * 1e3:>10.2f}{plain / dsv4:>9.1f}x")
    print(json.dumps({name: {"plain_ms": p * 1e3, "dsv4_ms": d * 1e3, "speedup": p / d}
                      for name, (p, d) in rows.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
