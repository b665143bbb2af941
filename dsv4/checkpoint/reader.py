"""Lazy reading of single-file and sharded safetensors checkpoints.

Tensors are memory-mapped by safetensors and materialised one at a time on `get`, so loading a
model never holds a second full copy of the weights in RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from dsv4.checkpoint.layout import scale_name
from dsv4.quant.fp4 import dequantize_fp4
from dsv4.quant.fp8 import dequantize_fp8_block

INDEX_FILE = "model.safetensors.index.json"


def read_config(path: str | Path) -> dict:
    """The `config.json` of a model folder, with errors that say what is wrong."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {config_path.parent}: a model folder needs "
                                "config.json next to its safetensors files")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc


class CheckpointReader:
    """Name -> tensor access over one `.safetensors` file or a sharded folder."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint path {path} does not exist")
        self._file_of: dict[str, Path] = {}
        weight_map: dict | None = None
        if path.is_file():
            files = [path]
        elif (path / INDEX_FILE).is_file():
            index = json.loads((path / INDEX_FILE).read_text())
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path / INDEX_FILE} has no 'weight_map' object")
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"shards listed in {INDEX_FILE} are missing from {path}: "
                                        f"{missing}")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {path}")
        self._handles = {f: _open_shard(f) for f in files}
        for f, handle in self._handles.items():
            for name in handle.keys():
                self._file_of[name] = f
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._file_of))
            if absent:
                raise ValueError(f"tensors listed in {INDEX_FILE} are not in their shards: "
                                 f"{absent[:5]}{' ...' if len(absent) > 5 else ''}")

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _slice(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is not in the checkpoint")
        return self._handles[self._file_of[name]].get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is not in the checkpoint")
        return self._handles[self._file_of[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype string (e.g. 'F8_E4M3', 'I8', 'BF16')."""
        return self._slice(name).get_dtype()


def load_weight(reader: CheckpointReader, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The tensor `name` in `dtype`, dequantising FP8 (e4m3 + block scale) and FP4 (packed
    int8 + per-32 scale) weights of the released layout transparently."""
    tensor = reader.get(name)
    scale_key = scale_name(name) if name.endswith(".weight") else None
    if scale_key is None or scale_key not in reader:
        return tensor.to(dtype)
    scale = reader.get(scale_key)
    if tensor.dtype == torch.float8_e4m3fn:
        return dequantize_fp8_block(tensor, scale, dtype)
    if tensor.dtype in (torch.int8, torch.uint8):
        return dequantize_fp4(tensor, scale, dtype)
    raise ValueError(f"{name} has a scale tensor but is stored as {tensor.dtype}; expected "
                     "float8_e4m3fn (FP8) or int8 (packed FP4)")


def logical_shape(reader: CheckpointReader, name: str) -> tuple[int, ...]:
    """Shape of the dequantised tensor (packed FP4 stores half the input columns)."""
    shape = reader.shape(name)
    if name.endswith(".weight") and scale_name(name) in reader and reader.dtype(name) == "I8":
        return (shape[0], shape[1] * 2)
    return shape


def _open_shard(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError: a truncated download, or not safetensors
        raise ValueError(f"{file} is not a readable safetensors file ({exc}); it may be "
                         "truncated: download it again") from None
