"""Real FP8 storage of one V4 KV entry: 584 bytes instead of 1024 for 512 bf16 dims.

Layout (matching what the reference's QAT forward pass computes, so storing it loses
nothing that the model did not already see in training):
  [0, 448)    e4m3 codes of the non-RoPE dims, 7 blocks of 64
  [448, 576)  the 64 RoPE dims in bf16 (128 bytes), unquantised
  [576, 583)  the 7 block scales as ue8m0 exponent bytes
  [583]       padding, so an entry is a multiple of 8 bytes
"""

from __future__ import annotations

import torch

from dsv4.quant.act import KV_FP8_BLOCK
from dsv4.quant.scales import FP8_E4M3_MAX, pow2_scale


def kv_fp8_entry_bytes(head_dim: int = 512, rope_head_dim: int = 64) -> int:
    nope_dim = head_dim - rope_head_dim
    unpadded = nope_dim + 2 * rope_head_dim + nope_dim // KV_FP8_BLOCK
    return -(-unpadded // 8) * 8


KV_FP8_ENTRY_BYTES = kv_fp8_entry_bytes()  # 584 for the released dims


def pack_kv_fp8(kv: torch.Tensor, rope_head_dim: int = 64) -> torch.Tensor:
    """[..., head_dim] float -> [..., entry_bytes] uint8."""
    head_dim = kv.shape[-1]
    nope_dim = head_dim - rope_head_dim
    lead = kv.shape[:-1]
    nope = kv[..., :nope_dim].float().reshape(*lead, nope_dim // KV_FP8_BLOCK, KV_FP8_BLOCK)
    scale = pow2_scale(nope.abs().amax(dim=-1), FP8_E4M3_MAX)  # [..., num_blocks]
    codes = (nope / scale[..., None]).to(torch.float8_e4m3fn).reshape(*lead, nope_dim)
    out = torch.zeros(*lead, kv_fp8_entry_bytes(head_dim, rope_head_dim), dtype=torch.uint8,
                      device=kv.device)
    rope_end = nope_dim + 2 * rope_head_dim
    out[..., :nope_dim] = codes.view(torch.uint8)
    rope = kv[..., nope_dim:].to(torch.bfloat16).contiguous()
    out[..., nope_dim:rope_end] = rope.view(torch.uint8)
    out[..., rope_end:rope_end + scale.shape[-1]] = (torch.log2(scale) + 127).to(torch.uint8)
    return out


def unpack_kv_fp8(packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                  head_dim: int = 512, rope_head_dim: int = 64) -> torch.Tensor:
    """[..., entry_bytes] uint8 -> [..., head_dim] in `dtype`."""
    nope_dim = head_dim - rope_head_dim
    num_blocks = nope_dim // KV_FP8_BLOCK
    lead = packed.shape[:-1]
    rope_end = nope_dim + 2 * rope_head_dim
    codes = packed[..., :nope_dim].contiguous().view(torch.float8_e4m3fn).float()
    scale = torch.exp2(packed[..., rope_end:rope_end + num_blocks].float() - 127)
    nope = codes.reshape(*lead, num_blocks, KV_FP8_BLOCK) * scale[..., None]
    nope = nope.reshape(*lead, nope_dim)
    rope = packed[..., nope_dim:rope_end].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope, rope], dim=-1).to(dtype)
