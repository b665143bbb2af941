"""Writing checkpoints in the released layout, optionally quantised as the release is."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4.checkpoint.layout import scale_name, weight_format
from dsv4.checkpoint.reader import INDEX_FILE
from dsv4.quant.fp4 import quantize_fp4
from dsv4.quant.fp8 import quantize_fp8_block


def quantize_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FP8 linears and FP4 routed experts with their `.scale` tensors; the rest as given."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        kind = weight_format(name)
        if kind == "fp8":
            out[name], out[scale_name(name)] = quantize_fp8_block(tensor)
        elif kind == "fp4":
            out[name], out[scale_name(name)] = quantize_fp4(tensor)
        else:
            out[name] = tensor
    return out


def write_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path, *,
                     config: dict | None = None, quantize: str = "none",
                     num_shards: int = 1) -> Path:
    """Write `state_dict` as safetensors shards named like the release, plus
    `model.safetensors.index.json` when sharded and `config.json` when given."""
    if quantize not in ("none", "fp8"):
        raise ValueError(f"quantize must be 'none' or 'fp8', got {quantize!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = quantize_state_dict(state_dict) if quantize == "fp8" else dict(state_dict)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if num_shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    # Greedy fill in name order so each shard holds about total / num_shards bytes.
    target = total_bytes / num_shards
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for name in sorted(tensors):
        t = tensors[name]
        if filled >= target * len(shards) and len(shards) < num_shards:
            shards.append({})
        shards[-1][name] = t
        filled += t.numel() * t.element_size()
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path
