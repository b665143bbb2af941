"""Reads and writes of the paged hybrid cache for a ragged batch (reference PyTorch).

These are the cache-side halves of V4 attention; the model supplies the math in between
(projections, compressor pooling, indexer, attention with sink). All functions work on whole
batches through index tensors: no Python loop over requests.

Two kinds of storage (see kv_cache.py):

* **Rings** of R rows per state slot, position p in row `p % R`: the sliding window
  (R = sliding_window, KV entries) and the compressor's open-window buffers
  (R = 2m for the overlapping ratio-4 compressor, m for ratio 128; kv and score rows). A ring
  holds the last R positions before the step; this step's tokens come from the fresh tensors.
* **Compressed pools** in blocks, addressed through block tables, never overwritten.

fp8 pools hold packed 584-byte entries of V4's 512-channel KV (64 RoPE channels); pass
`fp8=True` to pack on write / unpack on read.
"""

from __future__ import annotations

import torch

from dsv4.engine.batch import RaggedBatch
from dsv4.quant.kv import pack_kv_fp8, unpack_kv_fp8


def _rows_out(pool_rows: torch.Tensor, fp8: bool) -> torch.Tensor:
    return unpack_kv_fp8(pool_rows) if fp8 else pool_rows


def ring_context(
    ring: torch.Tensor,
    fresh: torch.Tensor,
    batch: RaggedBatch,
    token_idx: torch.Tensor | None = None,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The R positions ending at each selected token, oldest first, from ring or fresh rows.

    ring: [num_slots, R, C] (or [.., 584] uint8 if fp8); fresh: [T, C], this step's rows in
    batch order; token_idx: [N] indices into the T tokens (default: all).
    Returns values [N, R, C] (fresh's dtype) and valid [N, R] (False for positions < 0,
    whose values are finite but meaningless).
    """
    num_ring_rows = ring.shape[1]
    if token_idx is None:
        token_idx = torch.arange(batch.num_tokens, device=fresh.device)
    seq = batch.seq_index[token_idx]  # [N]
    pos = batch.positions[token_idx]  # [N]
    offsets = torch.arange(num_ring_rows, device=fresh.device) - (num_ring_rows - 1)
    ctx_pos = pos[:, None] + offsets[None, :]  # [N, R]
    valid = ctx_pos >= 0
    start = batch.start_pos[seq][:, None]  # [N, 1]
    from_ring = ctx_pos < start
    ring_rows = batch.state_slots[seq][:, None] * num_ring_rows + ctx_pos % num_ring_rows
    fresh_rows = (batch.query_start_loc[seq][:, None] + ctx_pos - start).clamp(
        0, max(fresh.shape[0] - 1, 0)
    )
    ring_flat = ring.reshape(-1, *ring.shape[2:])
    if fp8:  # unpack only the ring rows that are read
        ring_vals = _rows_out(ring_flat[ring_rows], fp8).to(fresh.dtype)
        vals = torch.where(from_ring[..., None], ring_vals, fresh[fresh_rows])  # [N, R, C]
    else:  # one gather from [ring rows; fresh rows]
        source = torch.cat([ring_flat.to(fresh.dtype), fresh], dim=0)
        rows = torch.where(from_ring, ring_rows, ring_flat.shape[0] + fresh_rows)
        vals = source[rows]  # [N, R, C]
    # rows of invalid positions (before the sequence start) hold finite junk: callers mask
    # them through `valid` (attention logits, compressor scores)
    return vals, valid


def write_ring(ring: torch.Tensor, fresh: torch.Tensor, batch: RaggedBatch, fp8: bool = False):
    """Store this step's rows in the ring: only each request's last R tokens, so no row is
    written twice (the order of duplicate writes in an index_put is undefined)."""
    num_ring_rows = ring.shape[1]
    keep = batch.positions >= batch.seq_lens[batch.seq_index] - num_ring_rows  # [T]
    rows = batch.state_slots[batch.seq_index] * num_ring_rows + batch.positions % num_ring_rows
    values = fresh[keep]
    if fp8:
        values = pack_kv_fp8(values)
    ring.view(-1, *ring.shape[2:])[rows[keep]] = values.to(ring.dtype)


def write_compressed(
    pool: torch.Tensor, slot_mapping: torch.Tensor, entries: torch.Tensor, fp8: bool = False
):
    """Store new compressed entries (or indexer keys). slot_mapping: [T] with -1 for tokens
    that close no entry; entries: [E, C], one per token with slot >= 0, in token order."""
    rows = slot_mapping[slot_mapping >= 0]
    if fp8:
        entries = pack_kv_fp8(entries)
    pool.view(-1, *pool.shape[2:])[rows] = entries.to(pool.dtype)


def gather_compressed(
    pool: torch.Tensor,
    batch: RaggedBatch,
    ratio: int,
    block_size: int,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every request's compressed entries after this step's writes.

    pool: [num_blocks, block_size // ratio, C]. Returns entries [B, E, C] with
    E = max over requests of seq_lens // ratio, and valid [B, E].
    """
    per_block = block_size // ratio
    num_entries = batch.seq_lens // ratio  # [B]
    width = int(num_entries.max()) if num_entries.numel() else 0
    w = torch.arange(width, device=pool.device)[None, :]  # [1, E]
    valid = w < num_entries[:, None]  # [B, E]
    col = ((w * ratio) // block_size).clamp(max=batch.block_tables.shape[1] - 1)
    block = batch.block_tables.gather(1, col.expand(len(num_entries), -1))  # [B, E]
    rows = (block * per_block + w % per_block).masked_fill(~valid, 0)
    flat = pool.reshape(-1, *pool.shape[2:])
    vals = _rows_out(flat[rows], fp8)
    return vals.masked_fill(~valid[..., None], 0), valid


def compressed_visibility(batch: RaggedBatch, ratio: int, num_entries: int) -> torch.Tensor:
    """[T, E] bool: token at position t may see compressed entry w iff w < (t + 1) // ratio."""
    w = torch.arange(num_entries, device=batch.positions.device)[None, :]
    return w < ((batch.positions + 1) // ratio)[:, None]
