"""NVIDIA GPUs through torch.cuda (NCCL for multi-GPU)."""

from __future__ import annotations

import torch

from dsv4.platforms.base import Platform


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"

    @classmethod
    def is_available(cls) -> bool:
        try:
            return torch.cuda.is_available()
        except Exception:  # a broken driver must not break platform discovery
            return False

    @classmethod
    def device_count(cls) -> int:
        return torch.cuda.device_count()

    @property
    def supports_fp8_compute(self) -> bool:  # type: ignore[override]
        return self.is_available() and torch.cuda.get_device_capability(self.index) >= (8, 9)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def memory_bytes(self) -> int:
        return torch.cuda.get_device_properties(self.index).total_memory

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)
