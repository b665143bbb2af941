"""Linears that read the same input, fused for inference into one product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.platforms import cpu_kernels


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """Put the weights of `linears` (no biases) in one [sum of outs, in] tensor, in the order
    given, and make each Linear's weight a view of its rows: no extra memory, and one product
    with the result computes all of them (a batched decode step then makes one BLAS call
    where it made several). The parameters share storage afterwards, which safetensors
    refuses to save: the engine fuses, checkpoint and training code do not."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    return fused


def packed_for_kernels(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of `weight` [out, in] in the layout of the CPU kernels (`cpu_kernels.pack`),
    for `linear`; None where they do not run (not bf16, no AVX-512 BF16, odd shapes)."""
    return cpu_kernels.pack(weight.detach()) if cpu_kernels.can_pack(weight) else None


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight), through the CPU kernel where `packed` exists (1.8x-2.5x faster at
    32 rows, 2x-3x at 9, the same at 2,048, on a 2-core Zen 4 EPYC), except in a compiled
    graph of a few rows: inductor turns those products into fused loops (`CpuPlatform`)."""
    if packed is None or not cpu_kernels.enabled or (
            torch.compiler.is_compiling() and x.numel() // x.shape[-1] <= _few_rows()):
        return F.linear(x, weight)
    return cpu_kernels.linear(x, packed)


def _few_rows() -> int:
    from dsv4.model import moe  # which imports this module

    return moe.GATHERED_MAX_TOKENS
