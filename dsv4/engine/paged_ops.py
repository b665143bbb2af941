"""Reads and writes of the paged hybrid cache for a ragged batch (reference PyTorch).

These are the cache-side halves of V4 attention; the model supplies the math in between
(projections, compressor pooling, indexer, attention with sink). All functions work on whole
batches through index tensors: no Python loop over requests.

Two kinds of storage (see kv_cache.py):

* **Rings** of R rows per state slot, position p in row `p % R`: the sliding window
  (R = sliding_window, KV entries) and the compressor's open-window buffers
  (R = 2m for the overlapping ratio-4 compressor, m for ratio 128; kv and score rows). A ring
  holds the last R positions before the step; this step's tokens come from the fresh tensors.
* **Compressed pools** in blocks, addressed through block tables. An entry is written when a
  token closes its window; only an MTP draft that was then rejected can have closed it, and
  the real token rewrites it in the next step before anything reads it.

fp8 pools hold packed 584-byte entries of V4's 512-channel KV (64 RoPE channels); pass
`fp8=True` to pack on write / unpack on read.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    batch order; token_idx: [N] indices into the T tokens (default: all). The row indices are
    computed once per batch, ring shape and token_idx object (pass the same one to reuse them).
    Returns values [N, R, C] (fresh's dtype) and valid [N, R] (False for positions < 0,
    whose values are finite but meaningless).
    """
    def make():
        tokens = torch.arange(batch.num_tokens, device=fresh.device) if token_idx is None \
            else token_idx
        index = _context_index(batch, batch.seq_index[tokens], batch.positions[tokens],
                               ring.shape[1], ring.shape[:2], fresh.shape[0])
        return token_idx, index, index.positions >= 0  # token_idx kept alive: its id is the key

    key = ("ring_context", None if token_idx is None else id(token_idx), ring.shape[:2],
           fresh.shape[0])
    _, index, valid = batch.per_step(key, make)
    return _read_context(ring, fresh, index, fp8), valid


@dataclass
class _ContextIndex:
    """Where each of N x num_rows context rows comes from (see `_context_index`)."""

    positions: torch.Tensor  # [N, num_rows]
    from_ring: torch.Tensor  # [N, num_rows] bool
    ring_rows: torch.Tensor  # [N, num_rows] rows of the flattened ring
    fresh_rows: torch.Tensor  # [N, num_rows] rows of this step's fresh tensor
    joint_rows: torch.Tensor  # [N, num_rows] rows of cat([flattened ring, fresh])


def _context_index(batch: RaggedBatch, seq: torch.Tensor, last_pos: torch.Tensor,
                   num_rows: int, ring_shape: tuple[int, int], num_fresh: int) -> _ContextIndex:
    """Rows of positions last_pos - num_rows + 1 .. last_pos of request `seq` ([N] each), each
    from the ring (positions before this step) or from fresh (this step's rows); rows of
    positions < 0 or past the request's tokens in this step hold finite junk that callers mask
    by position."""
    num_slots, ring_size = ring_shape
    offsets = torch.arange(num_rows, device=seq.device) - (num_rows - 1)
    ctx_pos = last_pos[:, None] + offsets[None, :]  # [N, num_rows]
    start = batch.start_pos[seq][:, None]  # [N, 1]
    from_ring = ctx_pos < start
    ring_rows = batch.state_slots[seq][:, None] * ring_size + ctx_pos % ring_size
    fresh_rows = (batch.query_start_loc[seq][:, None] + ctx_pos - start).clamp(
        0, max(num_fresh - 1, 0)
    )
    joint_rows = torch.where(from_ring, ring_rows, num_slots * ring_size + fresh_rows)
    return _ContextIndex(ctx_pos, from_ring, ring_rows, fresh_rows, joint_rows)


def _read_context(ring: torch.Tensor, fresh: torch.Tensor, index: _ContextIndex,
                  fp8: bool) -> torch.Tensor:
    ring_flat = ring.reshape(-1, *ring.shape[2:])
    if fp8 or index.ring_rows.numel() < ring_flat.shape[0]:
        # few rows read (decode) or packed FP8: gather (and unpack) just those rows
        ring_vals = _rows_out(ring_flat[index.ring_rows], fp8).to(fresh.dtype)
        return torch.where(index.from_ring[..., None], ring_vals, fresh[index.fresh_rows])
    # many rows read (prefill): one gather from [ring rows; fresh rows] is cheaper
    return torch.cat([ring_flat.to(fresh.dtype), fresh], dim=0)[index.joint_rows]


@dataclass
class QueryBlocks:
    """This step's tokens cut into blocks of `size` consecutive tokens of one request, so that
    a block's queries share one window band of size + W - 1 keys (prefill reads each cached
    row about twice, not W times). A request's last block may be padded: its extra slots
    point at whatever tokens follow, and their outputs are never read.

    token_index, positions: [NB, size]; seq: [NB];
    slot: [N] the flat block slot (block * size + offset) of each selected token;
    tokens: [N] the selected tokens, in batch order."""

    size: int
    token_index: torch.Tensor
    positions: torch.Tensor
    seq: torch.Tensor
    slot: torch.Tensor
    tokens: torch.Tensor


def query_blocks(batch: RaggedBatch, size: int, requests: torch.Tensor) -> QueryBlocks:
    """Blocks of `size` tokens over the requests selected by the bool mask `requests` [B]."""
    device = batch.positions.device
    num_new = (batch.query_start_loc[1:] - batch.query_start_loc[:-1]) * requests
    num_blocks = (num_new + size - 1) // size  # [B]
    first_block = num_blocks.cumsum(0) - num_blocks
    seq = torch.repeat_interleave(torch.arange(len(num_new), device=device), num_blocks)
    local = (torch.arange(len(seq), device=device) - first_block[seq]) * size  # [NB]
    offsets = local[:, None] + torch.arange(size, device=device)  # [NB, size]
    token_index = (batch.query_start_loc[seq][:, None] + offsets).clamp(
        max=max(batch.num_tokens - 1, 0))
    positions = batch.start_pos[seq][:, None] + offsets
    tokens = requests[batch.seq_index].nonzero().squeeze(1)
    tseq = batch.seq_index[tokens]
    rank = tokens - batch.query_start_loc[tseq]
    slot = (first_block[tseq] + rank // size) * size + rank % size
    return QueryBlocks(size, token_index, positions, seq, slot, tokens)


def window_band(ring: torch.Tensor, fresh: torch.Tensor, batch: RaggedBatch,
                blocks: QueryBlocks, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's window keys: values [NB, K, C] with K = size + W - 1 and valid
    [NB, size, K] (key within the W positions ending at the query)."""
    window = ring.shape[1]

    def make():
        index = _context_index(batch, blocks.seq, blocks.positions[:, -1],
                               blocks.size + window - 1, ring.shape[:2], fresh.shape[0])
        q = blocks.positions[:, :, None]
        k = index.positions[:, None, :]
        return blocks, index, (k <= q) & (k > q - window) & (k >= 0)  # blocks kept alive

    key = ("window_band", id(blocks), ring.shape[:2], fresh.shape[0])
    _, index, valid = batch.per_step(key, make)
    return _read_context(ring, fresh, index, fp8), valid


def write_ring(ring: torch.Tensor, fresh: torch.Tensor, batch: RaggedBatch, fp8: bool = False):
    """Store this step's rows in the ring: only each request's last R tokens, so no row is
    written twice (the order of duplicate writes in an index_put is undefined)."""
    def make():
        num_ring_rows = ring.shape[1]
        keep = batch.positions >= batch.seq_lens[batch.seq_index] - num_ring_rows  # [T]
        rows = batch.state_slots[batch.seq_index] * num_ring_rows + \
            batch.positions % num_ring_rows
        if bool(keep.all()):  # decodes and short chunks: every row is written
            return None, rows
        kept = keep.nonzero().squeeze(1)
        return kept, rows[kept]

    kept, rows = batch.per_step(("write_ring", ring.shape[1]), make)
    values = fresh if kept is None else fresh[kept]
    if fp8:
        values = pack_kv_fp8(values)
    ring.view(-1, *ring.shape[2:])[rows] = values.to(ring.dtype)


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
    rows, valid = batch.per_step(
        ("gather_compressed", ratio, block_size),
        lambda: entry_pool_rows(batch.block_tables, batch.seq_lens // ratio, ratio, block_size))
    vals = _rows_out(pool.reshape(-1, *pool.shape[2:])[rows], fp8)
    return vals.masked_fill(~valid[..., None], 0), valid


def entry_pool_rows(block_tables: torch.Tensor, num_entries: torch.Tensor, ratio: int,
                    block_size: int, min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each request's compressed entries 0..E-1 lie in a `[num_blocks * block_size //
    ratio, entry]` view of a pool: rows [B, E] (0 where there is none) and valid [B, E], for
    num_entries [B] and E = max(num_entries.max(), min_width)."""
    per_block = block_size // ratio
    width = max(int(num_entries.max()) if num_entries.numel() else 0, min_width)
    w = torch.arange(width, device=num_entries.device)[None, :]  # [1, E]
    valid = w < num_entries[:, None]
    col = ((w * ratio) // block_size).clamp(max=block_tables.shape[1] - 1)
    block = block_tables.gather(1, col.expand(len(num_entries), -1))  # [B, E]
    return (block * per_block + w % per_block).masked_fill(~valid, 0), valid


def compressed_visibility(batch: RaggedBatch, ratio: int, num_entries: int) -> torch.Tensor:
    """[T, E] bool: token at position t may see compressed entry w iff w < (t + 1) // ratio."""
    def make():
        w = torch.arange(num_entries, device=batch.positions.device)[None, :]
        return w < ((batch.positions + 1) // ratio)[:, None]

    return batch.per_step(("compressed_visibility", ratio, num_entries), make)
