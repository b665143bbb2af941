"""The contract every platform (cpu, cuda, npu) fulfils.

A platform owns everything device-specific: which torch device string to use, which dtypes
and number formats the hardware computes in natively, which torch.distributed backend joins
its devices, and how to synchronise, seed and measure memory. Code outside `dsv4/platforms/`
asks the platform instead of calling `torch.cuda` or `torch_npu`, so adding a backend means
adding one module here and one line to the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Platform(ABC):
    name: str = ""
    device_type: str = ""  # the torch device string: "cpu", "cuda", "npu"
    dist_backend: str = ""  # torch.distributed backend: "gloo", "nccl", "hccl"
    supports_fp8_compute: bool = False  # native FP8 matmuls (Hopper, Ascend 950)
    # torch.compile options for the engine's compiled decode step (EngineConfig.compile);
    # None where that step has not been built and tested for this platform
    compile_options: dict | None = None

    def __init__(self, index: int = 0):
        self.index = index  # which device of this kind ("cuda:1" -> 1)

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """True when this machine has a usable device of this kind. Must not raise."""

    @classmethod
    def device_count(cls) -> int:
        """Devices of this kind on this machine (the CPU counts as one)."""
        return 1

    def device(self) -> torch.device:
        return torch.device(self.device_type, self.index) if self.device_type != "cpu" \
            else torch.device("cpu")

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for queued work on the device (for timing)."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Total memory of one device (system RAM for the CPU)."""

    def empty_cache(self) -> None:  # noqa: B027 - optional hook, a no-op where no cache exists
        """Return cached allocator blocks to the device, where that means anything."""

    def configure_allocator(self) -> None:  # noqa: B027 - optional hook
        """Tune the process's memory allocator for an inference engine (called once, when an
        engine starts on this platform)."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, index={self.index})"
