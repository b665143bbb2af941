"""Platform registry: `get_platform("cpu" | "cuda" | "npu" | None)`.

Backends are imported lazily so that asking for the CPU never imports CUDA or Ascend code.
"""

from __future__ import annotations

import importlib

from dsv4.platforms.base import Platform

# name -> "module:Class", in order of preference when no name is given
_REGISTRY: dict[str, str | type[Platform]] = {
    "cuda": "dsv4.platforms.cuda:CudaPlatform",
    "npu": "dsv4.platforms.npu:NpuPlatform",
    "cpu": "dsv4.platforms.cpu:CpuPlatform",
}

_HINTS = {
    "cuda": "no CUDA device is visible (check nvidia-smi and that torch is a CUDA build); "
            "use --device cpu",
    "npu": "no Ascend NPU is visible (torch_npu missing or no device); use --device cpu",
}


def register_platform(name: str, target: str | type[Platform]) -> None:
    """Add a backend: `target` is a Platform subclass or a lazy "module:Class" string."""
    _REGISTRY[name] = target


def _load(name: str) -> type[Platform]:
    target = _REGISTRY[name]
    if isinstance(target, type):
        return target
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def available_platforms() -> list[str]:
    return [name for name in _REGISTRY if _load(name).is_available()]


def get_platform(name: str | None = None) -> Platform:
    """The platform called `name`, or the best available one (cuda, npu, then cpu)."""
    if name is None:
        return _load(available_platforms()[0])()
    base, _, index = name.partition(":")  # torch-style "cuda:1" picks the second GPU
    if base not in _REGISTRY:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(_REGISTRY)}")
    if index and not index.isdigit():
        raise ValueError(f"device {name!r}: the part after ':' must be a device number, "
                         f"as in {base}:0")
    cls = _load(base)
    if not cls.is_available():
        raise ValueError(f"device {name!r} is not available here: {_HINTS.get(base, '')}")
    number, count = int(index or 0), cls.device_count()
    if number >= count:
        raise ValueError(f"device {name!r}: this machine has {count} {base} device(s), "
                         f"numbered from 0; use {base}:0 to {base}:{count - 1}")
    return cls(number)


__all__ = ["Platform", "available_platforms", "get_platform", "register_platform"]
