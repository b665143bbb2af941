"""`load_model`: a model folder in the released layout -> a ready `Transformer`.

The network is built on the meta device (no memory), then each tensor is read lazily from
the safetensors shards, dequantised if stored as FP8/FP4, checked against the shape the
config implies, and placed on the target device: one copy of the weights, never two.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dsv4.checkpoint.layout import scale_name
from dsv4.checkpoint.reader import CheckpointReader, load_weight, logical_shape
from dsv4.model.config import PRESETS, ModelArgs
from dsv4.model.rope import rope_inv_freq
from dsv4.model.transformer import Transformer
from dsv4.platforms import get_platform

# Parameters kept in float32 whatever the model dtype, as the release stores them.
FP32_PARAMS = re.compile(r"(norm\.weight|hc_\w+|attn_sink|\.ape|gate\.bias)$")


def build_model(
    args: ModelArgs,
    device: str | torch.device = "meta",
    kv_cache_dtype: str = "auto",
    indexer_cache_dtype: str = "auto",
) -> Transformer:
    with torch.device(device):
        return Transformer(args, kv_cache_dtype, indexer_cache_dtype)


def load_model(
    path: str | Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    kv_cache_dtype: str | None = None,
    indexer_cache_dtype: str | None = None,
) -> Transformer:
    """Load a V4 checkpoint folder. `device`: "cpu", "cuda", "cuda:1", "npu" or None (best
    available); `dtype`: None for the platform's default (bf16, or float32 on a CPU without
    bf16 matmuls).

    Numerics defaults follow the checkpoint: a quantised release (its config has a
    quantization_config) gets the FP8 KV cache and FP4 indexer it was trained with;
    otherwise "auto" (the model dtype, no in-forward quantisation).
    """
    if str(path) in PRESETS:
        raise ValueError(
            f"{path!r} is a preset (a config without weights); give a model folder "
            "with safetensors files, or use `dsv4 info --model {path}`"
        )
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    platform = get_platform(device)
    dtype = dtype or platform.default_dtype
    args = ModelArgs.from_json(path)
    # (small models whose dims do not fit the FP8 / Hadamard blocks run unquantised)
    fp8_ok = (args.head_dim - args.qk_rope_head_dim) % 64 == 0
    fp4_ok = args.index_head_dim & (args.index_head_dim - 1) == 0 and args.index_head_dim >= 32
    kv_cache_dtype = kv_cache_dtype or ("fp8" if args.is_quantized and fp8_ok else "auto")
    indexer_cache_dtype = indexer_cache_dtype or (
        "fp4" if args.is_quantized and fp4_ok else "auto")
    model = build_model(args, "meta", kv_cache_dtype, indexer_cache_dtype)
    reader = CheckpointReader(path)
    target = platform.device()
    state = _read_state(model, reader, dtype, target)
    model.load_state_dict(state, assign=True, strict=True)
    rd = args.qk_rope_head_dim
    model.inv_freq_window = rope_inv_freq(
        rd, args.rope_theta, None, args.max_position_embeddings
    ).to(target)
    model.inv_freq_compress = rope_inv_freq(
        rd, args.compress_rope_theta, args.rope_scaling, args.max_position_embeddings
    ).to(target)
    return model.eval()


def _read_state(
    model: Transformer, reader: CheckpointReader, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    expected = model.state_dict()  # meta tensors: names, shapes, dtypes
    stored = set(reader.keys())
    scales = {scale_name(n) for n in expected if n.endswith(".weight")} & stored
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected) - scales)
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing tensors ({len(missing)}): {missing[:8]}")
        if unexpected:
            lines.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
        raise ValueError("checkpoint does not match its config.json: " + "; ".join(lines))
    state = {}
    for name, meta in expected.items():
        found = logical_shape(reader, name)
        if tuple(found) != tuple(meta.shape):
            raise ValueError(
                f"tensor {name} has shape {list(found)} in the checkpoint; the "
                f"config implies {list(meta.shape)}"
            )
        if meta.is_floating_point():
            want = torch.float32 if FP32_PARAMS.search(name) else dtype
            state[name] = load_weight(reader, name, want).to(device)
        else:
            state[name] = reader.get(name).to(device=device, dtype=meta.dtype)
    return state
