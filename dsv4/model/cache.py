"""Decode state of one sequence batch (all sequences at the same position).

Per layer: a ring buffer of the last `window` KV entries, the compressed entries so far, the
indexer keys so far (CSA layers) and each compressor's partial-window state. The paged,
multi-request version of the same layout lives in `dsv4/engine/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompressorState:
    """Rows of the window still open (kv and gate scores, ape added), and for overlapping
    compressors the first-half rows (Ca) of the last closed window."""

    pending_kv: torch.Tensor | None = None  # [B, r, width] float32, r < ratio
    pending_score: torch.Tensor | None = None
    prev_kv: torch.Tensor | None = None  # [B, ratio, dim] float32
    prev_score: torch.Tensor | None = None


@dataclass
class LayerCache:
    window: torch.Tensor | None = None  # [B, W, head_dim] ring, slot = position % W
    compressed: torch.Tensor | None = None  # [B, T, head_dim]
    index_keys: torch.Tensor | None = None  # [B, T, index_head_dim]
    compressor: CompressorState = field(default_factory=CompressorState)
    index_compressor: CompressorState = field(default_factory=CompressorState)


@dataclass
class ModelCache:
    layers: list[LayerCache]
    num_tokens: int = 0  # positions already processed

    @classmethod
    def empty(cls, num_layers: int) -> ModelCache:
        return cls([LayerCache() for _ in range(num_layers)])
