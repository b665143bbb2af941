"""The CPU: plain PyTorch, the reference every other platform is tested against."""

from __future__ import annotations

import os

from dsv4.platforms.base import Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
