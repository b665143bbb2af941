"""The quantisation that V4's reference applies inside its forward pass (trained with QAT),
simulated as quantise-then-dequantise so that any platform reproduces the same numbers.

- KV vectors: the non-RoPE dims go through FP8 e4m3 in blocks of 64 with ue8m0 scales.
- Indexer queries and keys: a Hadamard rotation, then FP4 e2m1 in blocks of 32.
"""

from __future__ import annotations

import torch

from dsv4.quant.fp4 import e2m1_table, encode_e2m1
from dsv4.quant.scales import FP4_E2M1_MAX, FP8_E4M3_MAX, pow2_scale

KV_FP8_BLOCK = 64
INDEXER_FP4_BLOCK = 32


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block size {block}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def fp8_roundtrip(x: torch.Tensor, block: int = KV_FP8_BLOCK) -> torch.Tensor:
    """Quantise the last dim to e4m3 per block of `block` with power-of-two scales, and back."""
    blocks = _blocked(x, block)
    scale = pow2_scale(blocks.abs().amax(dim=-1, keepdim=True), FP8_E4M3_MAX)
    q = (blocks / scale).to(torch.float8_e4m3fn).float() * scale
    return q.reshape(x.shape).to(x.dtype)


def fp4_roundtrip(x: torch.Tensor, block: int = INDEXER_FP4_BLOCK) -> torch.Tensor:
    """Quantise the last dim to e2m1 per block of `block` with power-of-two scales, and back."""
    blocks = _blocked(x, block)
    scale = pow2_scale(blocks.abs().amax(dim=-1, keepdim=True), FP4_E2M1_MAX)
    q = e2m1_table(x.device)[encode_e2m1(blocks / scale).long()] * scale
    return q.reshape(x.shape).to(x.dtype)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dim (a power of two): H x / sqrt(n).

    Rotating before FP4 spreads outlier channels over all channels, so one large value no
    longer forces a coarse scale on its whole block; q.k is unchanged since H is orthogonal.
    A butterfly of log2(n) stages, each one add or subtract per element: a row's result does
    not depend on the other rows (a matrix product's rounding can, with the number of rows,
    and FP4 codes near a boundary would then flip between a chunked and a whole prefill).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two dim, got {n}")
    y = x.float()
    h = 1
    while h < n:  # butterfly: pairs (i, i + h) within blocks of 2h
        a, b = y.reshape(*x.shape[:-1], n // (2 * h), 2, h).unbind(-2)
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return (y.reshape(x.shape) * n**-0.5).to(x.dtype)
