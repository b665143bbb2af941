"""One Muon step over dsv4-tiny's matrices, with the Newton-Schulz iteration in bfloat16 and in
float32, and in float32 with each shape's updates as one stack instead of cache-sized ones,
in the same process, against the time the step's matrix products would take at the float32
peak this process measures (a 1024 x 1024 product).

On a CPU with bf16 matmuls, bf16 is the faster dtype; on one without them (AVX2 only) torch's
bf16 fallback is many times slower, and `dsv4.train.muon` iterates in float32 there. Prints a
table, then one JSON line.

    python benchmarks/muon_step.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import dsv4.train.muon as muon
from dsv4.model.config import ModelArgs
from dsv4.model.transformer import Transformer
from dsv4.platforms import cpu
from dsv4.train.evaluate import BUNDLED


def newton_schulz_flops(matrices: list[torch.Tensor], steps: int = 5) -> float:
    """Per step of the iteration on an m x n matrix (m <= n): X X^T, its square, and the
    product with X: 2 m^2 n + 2 m^3 + 2 m^2 n."""
    total = 0.0
    for p in matrices:
        m, n = sorted(p.shape)
        total += steps * (4 * m * m * n + 2 * m**3)
    return total


def peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of the fastest of `repeats` float32 products (the first ones warm up threads)."""
    a = torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_seconds(optimizer: muon.Muon, repeats: int) -> float:
    optimizer.step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    model = Transformer(ModelArgs.from_json(BUNDLED))
    matrices, _ = muon.split_parameters(model)
    for p in matrices:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = muon.Muon(matrices, lr=1e-6)
    flops, peak, in_hardware = newton_schulz_flops(matrices), peak_flops(), cpu.has_bf16_matmul()
    rows = {}
    cache_sized = muon.stack_size
    for name, bf16, one_stack in (("float32", False, False), ("float32, one stack", False, True),
                                  ("bfloat16", True, False)):
        cpu.has_bf16_matmul = lambda bf16=bf16: bf16  # the platform's dtype, which Muon uses
        muon.stack_size = len if one_stack else cache_sized
        rows[name] = step_seconds(optimizer, opts.repeats)
    muon.stack_size = cache_sized
    print(f"bf16 matmuls in hardware: {in_hardware}; {len(matrices)} matrices, "
          f"{flops / 1e9:.1f} GFLOP per step; float32 peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'Newton-Schulz in':<22}{'seconds':>9}{'vs float32':>12}{'vs peak':>9}")
    for name, seconds in rows.items():
        print(f"{name:<22}{seconds:>9.3f}{seconds / rows['float32']:>11.2f}x"
              f"{flops / peak / seconds:>9.0%}")
    print(json.dumps({"bf16_matmul": in_hardware, "gflop": flops / 1e9,
                      "peak_gflops": peak / 1e9, "seconds": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
