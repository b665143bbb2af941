"""Power-of-two (ue8m0) block scales, the scale format of every V4 quantised tensor."""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
# Blocks whose amax is below this get the scale of this amax: keeps log2 finite for zeros.
MIN_AMAX = 1e-4


def pow2_scale(amax: torch.Tensor, format_max: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= format_max (float32, same shape as amax)."""
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=MIN_AMAX) / format_max)))


def to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Exact power-of-two float32 scales -> torch.float8_e8m0fnu."""
    return scale.to(torch.float8_e8m0fnu)
