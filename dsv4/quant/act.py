"""The quantisation that V4's reference applies inside its forward pass (trained with QAT),
simulated as quantise-then-dequantise so that any platform reproduces the same numbers.

- KV vectors: the non-RoPE dims go through FP8 e4m3 in blocks of 64 with ue8m0 scales.
- Indexer queries and keys: a Hadamard rotation, then FP4 e2m1 in blocks of 32.
"""

from __future__ import annotations

import functools

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
    One product with the n x n matrix: at the indexer's n = 64 that is a few ops where the
    log2(n) butterfly stages were dozens (this runs in every indexer layer of every step).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two dim, got {n}")
    return (x.float() @ _hadamard_matrix(n, x.device)).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    """Sylvester's construction H_2n = [[H, H], [H, -H]], scaled by 1 / sqrt(n); symmetric.
    Made outside inference mode, so that training may use it after an inference call."""
    with torch.inference_mode(False):
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
        return (h * n**-0.5).float().to(device)
