"""The CPU: plain PyTorch, the reference every other platform is tested against."""

from __future__ import annotations

import os

import torch

from dsv4.platforms.base import Platform


def has_bf16_matmul() -> bool:
    """True when this CPU runs bf16 matmuls in hardware (oneDNN's bf16 kernels, on AVX-512
    CPUs and newer). Without them (AVX2 only) torch falls back to a path many times slower than
    float32: 27x for a 512 x 512 product on a 2-core AVX2 EPYC, 2.7x to 3.6x for a dsv4-tiny
    prefill."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if has_bf16_matmul() else torch.float32

    def synchronize(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
