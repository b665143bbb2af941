"""FP8 e4m3 weights with one ue8m0 scale per 128x128 block (the released linear layers)."""

from __future__ import annotations

import torch

from dsv4.quant.scales import FP8_E4M3_MAX, pow2_scale, to_e8m0

WEIGHT_BLOCK = 128


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    pad_r, pad_c = -rows % block, -cols % block
    return torch.nn.functional.pad(w, (0, pad_c, 0, pad_r)) if pad_r or pad_c else w


def quantize_fp8_block(
    w: torch.Tensor, block: int = WEIGHT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (e4m3 [out, in], e8m0 scale [ceil(out/block), ceil(in/block)])."""
    if w.ndim != 2:
        raise ValueError(f"FP8 block quantisation takes a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    padded = _pad_to_blocks(w.float(), block)
    nr, nc = padded.shape[0] // block, padded.shape[1] // block
    blocks = padded.view(nr, block, nc, block)  # [nr, block, nc, block]
    scale = pow2_scale(blocks.abs().amax(dim=(1, 3)), FP8_E4M3_MAX)  # [nr, nc]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(nr * block, nc * block)[:rows, :cols].contiguous(), to_e8m0(scale)


def dequantize_fp8_block(w: torch.Tensor, scale: torch.Tensor,
                         dtype: torch.dtype = torch.float32,
                         block: int = WEIGHT_BLOCK) -> torch.Tensor:
    """Inverse of `quantize_fp8_block`: e4m3 [out, in] times its block scale, in `dtype`."""
    rows, cols = w.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 scale has shape {tuple(scale.shape)}; a [{rows}, {cols}] weight "
                         f"with {block}x{block} blocks needs {list(expected)}")
    full = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return (w.float() * full[:rows, :cols]).to(dtype)
