"""Huawei Ascend NPUs through torch_npu (HCCL for multi-NPU). torch_npu is imported only
when this platform is asked for, so machines without it never load it."""

from __future__ import annotations

import importlib

import torch

from dsv4.platforms.base import Platform


def _torch_npu():
    return importlib.import_module("torch_npu")


class NpuPlatform(Platform):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"

    @classmethod
    def is_available(cls) -> bool:
        try:
            _torch_npu()
            return bool(torch.npu.is_available())  # registered by importing torch_npu
        except Exception:
            return False

    @classmethod
    def device_count(cls) -> int:
        _torch_npu()
        return torch.npu.device_count()

    def synchronize(self) -> None:
        _torch_npu()
        torch.npu.synchronize(self.index)

    def memory_bytes(self) -> int:
        _torch_npu()
        return torch.npu.get_device_properties(self.index).total_memory

    def empty_cache(self) -> None:
        _torch_npu()
        torch.npu.empty_cache()
