"""KV-cache bytes of a V4 model: the one formula the planner and the engine share.

Per layer and token of context (V4_SPEC section 4): a CSA layer (ratio 4) keeps one
compressed entry and one indexer key per 4 tokens, an HCA layer (ratio 128) one entry per
128 tokens; every layer also keeps a fixed window of `sliding_window` entries per sequence.
"""

from __future__ import annotations

import math

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP8_BLOCK, FP4_BLOCK = 64, 32


def kv_entry_bytes(head_dim: int, rope_dim: int, kv_dtype: str = "bf16") -> int:
    """One KV entry. fp8: e4m3 non-RoPE dims + bf16 RoPE dims + one ue8m0 scale per 64 dims,
    padded to 8 bytes (584 for the released 512/64 dims)."""
    if kv_dtype == "fp8":
        nope = head_dim - rope_dim
        return math.ceil((nope + 2 * rope_dim + nope // FP8_BLOCK) / 8) * 8
    return head_dim * BYTES[kv_dtype]


def index_key_bytes(index_head_dim: int, indexer_dtype: str = "bf16") -> float:
    """One indexer key. fp4: two e2m1 values per byte + one ue8m0 scale per 32 dims."""
    if indexer_dtype == "fp4":
        return index_head_dim / 2 + index_head_dim // FP4_BLOCK
    return index_head_dim * BYTES[indexer_dtype]


def kv_bytes_per_token_by_layer(
    compress_ratios: list[int],
    head_dim: int,
    rope_dim: int,
    index_head_dim: int,
    kv_dtype: str = "bf16",
    indexer_dtype: str = "bf16",
) -> list[float]:
    """Bytes per token of context for each layer (the window excluded: it does not grow)."""
    entry = kv_entry_bytes(head_dim, rope_dim, kv_dtype)
    key = index_key_bytes(index_head_dim, indexer_dtype)
    return [0.0 if r == 0 else (entry + (key if r == 4 else 0)) / r for r in compress_ratios]


def kv_window_bytes(
    num_layers: int, sliding_window: int, head_dim: int, rope_dim: int, kv_dtype: str = "bf16"
) -> int:
    """The fixed per-sequence window of every layer."""
    return num_layers * sliding_window * kv_entry_bytes(head_dim, rope_dim, kv_dtype)


def kv_cache_bytes(
    config: dict, num_tokens: int, kv_dtype: str = "bf16", indexer_dtype: str = "bf16"
) -> float:
    """Whole-sequence KV bytes of a V4 `config.json` dict (MTP layer excluded), window included."""
    n = config["num_hidden_layers"]
    ratios = config["compress_ratios"][:n]
    hd, rd = config["head_dim"], config["qk_rope_head_dim"]
    per_token = sum(
        kv_bytes_per_token_by_layer(
            ratios, hd, rd, config["index_head_dim"], kv_dtype, indexer_dtype
        )
    )
    window = kv_window_bytes(n, min(config["sliding_window"], num_tokens), hd, rd, kv_dtype)
    return per_token * num_tokens + window
