"""FP4 e2m1 routed-expert weights: two codes per int8 byte, one ue8m0 scale per 32 inputs.

Byte layout of the release: the LOW nibble holds the even input index, the HIGH nibble the
odd one. A code is sign (bit 3), exponent (bits 2-1), mantissa (bit 0), per the OCP
microscaling spec: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
"""

from __future__ import annotations

import functools

import torch

from dsv4.quant.scales import FP4_E2M1_MAX, pow2_scale, to_e8m0

EXPERT_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [16]: the value of each 4-bit code (one shared tensor per device: read only)."""
    return _constants(torch.device(device))[1]


@functools.cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(magnitudes [8], code values [16], tie rank [8]: even mantissas outrank odd ones),
    made outside inference mode so that autograd may use them whoever cached them first."""
    with torch.inference_mode(False):
        mags = torch.tensor(E2M1_VALUES, device=device)
        return mags, torch.cat([mags, -mags]), 2 - torch.arange(8, device=device) % 2


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round values (already scaled into [-6, 6]) to the nearest e2m1 code, saturating at 6;
    a tie goes to the code with an even mantissa bit, as IEEE round-to-nearest-even does.
    Returns uint8 codes in [0, 16)."""
    mags, _, even_mantissa = _constants(x.device)
    distance = (x.float().abs().clamp(max=FP4_E2M1_MAX)[..., None] - mags).abs()  # [..., 8]
    nearest = distance == distance.min(dim=-1, keepdim=True).values
    code = torch.argmax(nearest * even_mantissa, dim=-1)
    negative = (x < 0) & (code > 0)
    return (code + 8 * negative).to(torch.uint8)


def quantize_fp4(w: torch.Tensor, block: int = EXPERT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in // 2] packed codes, e8m0 scale [out, in // block])."""
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"FP4 quantisation needs a 2-D weight whose input dim is a multiple of "
                         f"{block}, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    blocks = w.float().view(rows, cols // block, block)
    scale = pow2_scale(blocks.abs().amax(dim=-1), FP4_E2M1_MAX)  # [out, in // block]
    codes = encode_e2m1(blocks / scale[..., None]).view(rows, cols)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), to_e8m0(scale)


def unpack_fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out, in // 2] -> uint8 codes [out, in]."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_fp4`: [out, in] in `dtype`."""
    values = e2m1_table(packed.device)[unpack_fp4_codes(packed).long()]  # [out, in]
    rows, cols = values.shape
    block = cols // scale.shape[1]
    out = values.view(rows, -1, block) * scale.float()[..., None]
    return out.view(rows, cols).to(dtype)
