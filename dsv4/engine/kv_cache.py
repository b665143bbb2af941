"""The paged hybrid KV-cache layout of DeepSeek-V4.

V4 keeps four kinds of per-request attention state, and they grow differently:

| kind                    | layers         | size per request                               |
|-------------------------|----------------|------------------------------------------------|
| sliding window          | every layer    | fixed: `sliding_window` (128) KV entries        |
| compressor state        | CSA, HCA       | fixed: the open (not yet closed) window's rows  |
| compressed KV entries   | CSA (m=4), HCA (m=128) | grows: 1 entry per m tokens             |
| indexer keys            | CSA            | grows: 1 key per 4 tokens                       |

So the cache has two pools:

* **State slots** (fixed cost per running request). Slot `s` owns, in every layer, the window
  ring `window_kv[layer][s]` (`[window, entry]`, token at position p lives in row `p % window`)
  and, in compressed layers, the compressor's partial-window rows `compressor_kv/score` (CSA:
  2 x 4 rows of 2 x 512 channels because ratio-4 windows overlap; HCA: 128 rows of 512; the
  CSA indexer's own compressor: 2 x 4 rows of 2 x 128), kept in fp32 as the compressor computes.
  With MTP drafting on, the MTP layer (window only in the released configs) adds one more
  window ring per slot, `mtp.0.window_kv`.
* **Blocks** of `block_size` tokens of context (a multiple of 128). Block b holds, in every CSA
  layer, `block_size / 4` compressed entries and as many indexer keys, and in every HCA layer
  `block_size / 128` compressed entries. All growing kinds advance in step with the token count,
  so one block table per request serves them all: compressed entry w of a ratio-m layer lives
  in block `block_table[w * m // block_size]`, row `(w * m % block_size) // m`.

A request of L tokens needs one state slot and `ceil(L / block_size)` blocks. The byte budget is
split so that both pools run out together when every request has `reference_seq_len` tokens.

Entries are 512 channels (K = V). `kv_cache_dtype="bf16"`: 1024 bytes. `"fp8"`: the reference's
QAT format stored for real, 584 bytes = 448 e4m3 (non-RoPE dims, 7 blocks of 64 with ue8m0
scales) + 64 bf16 RoPE dims (128 bytes) + 7 scale bytes + 1 pad byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dsv4.plan.kv import index_key_bytes, kv_entry_bytes

KV_CACHE_DTYPES = ("bf16", "fp8")
@dataclass(frozen=True)
class CacheSpec:
    """What the cache needs to know of the model (field names as in the released config)."""

    num_hidden_layers: int
    compress_ratios: tuple[int, ...]  # one per layer: 0 window only, 4 CSA, 128 HCA
    sliding_window: int = 128
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    index_head_dim: int = 128
    kv_cache_dtype: str = "bf16"
    num_mtp_layers: int = 0  # window rings for MTP layers, when the engine drafts with them

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of "
                f"{KV_CACHE_DTYPES}."
            )
        if len(self.compress_ratios) != self.num_hidden_layers:
            raise ValueError(
                f"compress_ratios has {len(self.compress_ratios)} entries for "
                f"{self.num_hidden_layers} layers; pass one ratio per main layer."
            )
        bad = sorted({m for m in self.compress_ratios if m not in (0, 4, 128)})
        if bad:
            raise ValueError(f"compress_ratios contains {bad}; V4 layers use 0, 4 or 128.")

    @classmethod
    def from_config(cls, config: Any, kv_cache_dtype: str = "bf16",
                    num_mtp_layers: int = 0) -> CacheSpec:
        """From a ModelArgs, a transformers config or a config.json dict.

        Released configs list one extra ratio for the MTP layer (0: window only). The MTP
        layer gets a window ring only when the engine drafts with it (`num_mtp_layers`).
        """
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        num_layers = int(get("num_hidden_layers"))
        ratios = tuple(int(m) for m in get("compress_ratios"))[:num_layers]
        return cls(
            num_hidden_layers=num_layers,
            compress_ratios=ratios,
            sliding_window=int(get("sliding_window", 128)),
            head_dim=int(get("head_dim", 512)),
            qk_rope_head_dim=int(get("qk_rope_head_dim", 64)),
            index_head_dim=int(get("index_head_dim", 128)),
            kv_cache_dtype=kv_cache_dtype,
            num_mtp_layers=num_mtp_layers,
        )

    @property
    def csa_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.compress_ratios) if m == 4]

    @property
    def hca_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.compress_ratios) if m == 128]

    @property
    def entry_bytes(self) -> int:
        return kv_entry_bytes(self.head_dim, self.qk_rope_head_dim, self.kv_cache_dtype)

    @property
    def index_key_bytes(self) -> int:
        return int(index_key_bytes(self.index_head_dim, "bf16"))  # keys stay bf16 in both modes

    def compressor_state_rows(self, ratio: int) -> tuple[int, int]:
        """(rows, channels) of one compressor's open-window buffer; ratio 4 overlaps (x2)."""
        overlap = 2 if ratio == 4 else 1
        return overlap * ratio, overlap * self.head_dim

    @property
    def state_bytes_per_slot(self) -> int:
        """Fixed bytes per running request: window rings (main and MTP layers) + compressor
        states (fp32 kv+score)."""
        rings = self.num_hidden_layers + self.num_mtp_layers
        window = rings * self.sliding_window * self.entry_bytes
        compressor = 0
        for m in self.compress_ratios:
            if m:
                rows, ch = self.compressor_state_rows(m)
                compressor += 2 * rows * ch * 4
            if m == 4:  # the indexer's own overlapping compressor at index_head_dim
                compressor += 2 * (2 * m) * (2 * self.index_head_dim) * 4
        return window + compressor

    @property
    def bytes_per_token(self) -> float:
        """Growing bytes per token of context (the planner's figure: 6880 for V4-Flash bf16)."""
        csa = len(self.csa_layers) * (self.entry_bytes + self.index_key_bytes) / 4
        hca = len(self.hca_layers) * self.entry_bytes / 128
        return csa + hca


@dataclass(frozen=True)
class KVCacheLayout:
    """Pool sizes chosen for a byte budget: `num_state_slots` slots, `num_blocks` blocks."""

    spec: CacheSpec
    block_size: int  # tokens per block, a multiple of 128
    num_blocks: int
    num_state_slots: int

    @property
    def block_bytes(self) -> int:
        return int(self.block_size * self.spec.bytes_per_token)

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.num_state_slots * (
            self.spec.state_bytes_per_slot
        )

    @property
    def max_tokens_per_seq(self) -> int:
        """The longest sequence the block pool could hold if it had it to itself."""
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def pool_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor the runner allocates, one set per layer."""
        s = self.spec
        entry = (s.entry_bytes,) if s.kv_cache_dtype == "fp8" else (s.head_dim,)
        kv_dtype = torch.uint8 if s.kv_cache_dtype == "fp8" else torch.bfloat16
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for k in range(s.num_mtp_layers):
            shapes[f"mtp.{k}.window_kv"] = ((self.num_state_slots, s.sliding_window, *entry),
                                            kv_dtype)
        for layer, m in enumerate(s.compress_ratios):
            shapes[f"{layer}.window_kv"] = (
                (self.num_state_slots, s.sliding_window, *entry),
                kv_dtype,
            )
            if not m:
                continue
            shapes[f"{layer}.compressed_kv"] = (
                (self.num_blocks, self.block_size // m, *entry),
                kv_dtype,
            )
            rows, ch = s.compressor_state_rows(m)
            shapes[f"{layer}.compressor_kv"] = ((self.num_state_slots, rows, ch), torch.float32)
            shapes[f"{layer}.compressor_score"] = ((self.num_state_slots, rows, ch), torch.float32)
            if m == 4:
                shapes[f"{layer}.index_keys"] = (
                    (self.num_blocks, self.block_size // m, s.index_head_dim),
                    torch.bfloat16,
                )
                idx_shape = (self.num_state_slots, 2 * m, 2 * s.index_head_dim)
                shapes[f"{layer}.index_compressor_kv"] = (idx_shape, torch.float32)
                shapes[f"{layer}.index_compressor_score"] = (idx_shape, torch.float32)
        return shapes

    def allocate(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Zero-filled pools on `device` (the runner passes the platform's device)."""
        return {
            name: torch.zeros(shape, dtype=dtype, device=device)
            for name, (shape, dtype) in self.pool_shapes().items()
        }

    def pool_bytes(self) -> int:
        """Bytes the allocated pools occupy (equals total_bytes up to rounding of block_bytes)."""
        return sum(
            math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            for shape, dtype in self.pool_shapes().values()
        )


def plan_layout(
    spec: CacheSpec,
    kv_cache_memory_bytes: int,
    max_num_seqs: int,
    reference_seq_len: int,
    block_size: int = 128,
) -> KVCacheLayout:
    """Split a byte budget between state slots and blocks.

    Slots = min(max_num_seqs, budget // cost of one reference-length request), at least one;
    blocks take the rest, so with every request at `reference_seq_len` tokens both pools fill
    together. Fewer, longer requests borrow blocks; more, shorter ones are capped by the slots.
    """
    if block_size <= 0 or block_size % 128:
        raise ValueError(f"block_size={block_size} must be a positive multiple of 128.")
    layout = KVCacheLayout(spec, block_size, 0, 0)
    per_seq_bytes = spec.state_bytes_per_slot + layout.blocks_needed(reference_seq_len) * (
        layout.block_bytes
    )
    min_bytes = spec.state_bytes_per_slot + layout.block_bytes
    if kv_cache_memory_bytes < min_bytes:
        raise ValueError(
            f"kv_cache_memory_bytes={kv_cache_memory_bytes} is too small: one request needs at "
            f"least {min_bytes} bytes (its window/compressor state plus one {block_size}-token "
            f"block); raise kv_cache_memory_bytes."
        )
    slots = max(1, min(max_num_seqs, kv_cache_memory_bytes // per_seq_bytes))
    blocks = (kv_cache_memory_bytes - slots * spec.state_bytes_per_slot) // layout.block_bytes
    return KVCacheLayout(spec, block_size, int(blocks), int(slots))


# --- slot mappings: where each new token's cache rows go (flat row indices, -1 = none) --------


def window_slot_mapping(
    state_slots: torch.Tensor, positions: torch.Tensor, window: int
) -> torch.Tensor:
    """Flat row in a `[num_slots * window, entry]` view of a window ring. Both args: [T]."""
    return state_slots * window + positions % window


def compressed_slot_mapping(
    block_tables: torch.Tensor,
    seq_index: torch.Tensor,
    positions: torch.Tensor,
    ratio: int,
    block_size: int,
) -> torch.Tensor:
    """Flat row in a `[num_blocks * block_size // ratio, entry]` view of a compressed pool.

    block_tables: [num_seqs, max_blocks] int64 (padded with -1); seq_index, positions: [T].
    A token closes entry `pos // ratio` when `(pos + 1) % ratio == 0`; other tokens get -1.
    """
    entries_per_block = block_size // ratio
    closes = (positions + 1) % ratio == 0
    entry = positions // ratio
    block = block_tables[seq_index, (entry * ratio) // block_size]
    rows = block * entries_per_block + entry % entries_per_block
    return torch.where(closes, rows, torch.full_like(rows, -1))


# --- the fp8 entry format (real storage for kv_cache_dtype="fp8") -----------------------------
