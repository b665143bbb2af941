"""Decode steps with static shapes, for `torch.compile`.

When every scheduled request decodes one token (the steady state of serving), a step is the
same math as the runner's general ragged path, written here so that each transformer block
traces to one graph:

* every shape depends only on the number of requests B and the entry counts E of the
  compressed layers (CSA padded to at least the indexer's top-k, HCA to at least 2), never
  on values, so B and E are symbolic and one graph serves every batch and context length;
* what the general path skips by a host-side test is done for every request and masked:
  the compressors pool only the requests listed as closing a window (a count as symbolic as
  B), and an entry is stored for every request, where its window closed the new one (any
  other request rewrites a row it owns with the value it holds);
* CSA layers always attend to the indexer's gathered top-k (the general path attends to all
  entries under the top-k mask while there are few; the sums are the same).

Blocks are compiled one at a time (regional compilation): layers of the same kind share a
graph, so compiling costs the same for 4 layers or 61. A single request (B = 1) gets graphs of
its own, and so do up to 8 requests (`step_kind`): in both, inductor turns matrix products of
their few rows into fused loops instead of BLAS calls, and each request reads only its own
experts. Eagerly, a decode step of the small benchmark config is about 1,500 torch ops, each
dispatched for more time than its arithmetic takes on a CPU; docs/benchmarks.md has what
compiling gives.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from dsv4.engine.batch import RaggedBatch
from dsv4.engine.paged_ops import entry_pool_rows
from dsv4.model import moe
from dsv4.model.attention import quantize_indexer, quantize_kv_nope, sparse_attention, stable_topk
from dsv4.model.compressor import Compressor
from dsv4.model.hyper import hc_post
from dsv4.model.rope import apply_rope, rope_cos_sin
from dsv4.model.transformer import Block, Transformer
from dsv4.quant.kv import pack_kv_fp8, unpack_kv_fp8

MIN_HCA_ENTRIES = 2  # dynamo specialises sizes 0 and 1; pad past them so one graph serves all
MIN_CLOSING = 2  # the same for the requests whose window closes (`EntryRows.closing`)


@dataclass
class EntryRows:
    """Where a compressed layer's entries of each request live, for one decode step.

    rows: [B, E] flat pool rows of entries 0..E-1 (0 where there is none); valid: [B, E] the
    entry exists and the token may see it; closes: [B] the token closes a window; write: [B]
    the pool row of entry position // ratio, which a closing token fills and any other token
    rewrites with its own value (its block exists: the token is in it); closing: [P] the
    requests that close a window, padded with request 0 to `MIN_CLOSING` rows."""

    rows: torch.Tensor
    valid: torch.Tensor
    closes: torch.Tensor
    write: torch.Tensor
    closing: torch.Tensor


def is_plain_decode(batch: RaggedBatch) -> bool:
    """Every request brings one token and samples once: the shape the decode graph serves."""
    return batch.num_tokens == len(batch.scheduled) == len(batch.logits_indices)


def entry_rows(batch: RaggedBatch, ratio: int, block_size: int, min_entries: int) -> EntryRows:
    positions = batch.positions  # one token per request
    rows, valid = entry_pool_rows(batch.block_tables, (positions + 1) // ratio, ratio,
                                  block_size, min_entries)  # the entries visible to the token
    own_block = batch.block_tables.gather(1, (positions // block_size)[:, None])[:, 0]
    per_block = block_size // ratio
    write = own_block * per_block + (positions // ratio) % per_block
    closes = (positions + 1) % ratio == 0
    closing = closes.nonzero().squeeze(1)
    closing = torch.cat([closing, closing.new_zeros(max(0, MIN_CLOSING - len(closing)))])
    return EntryRows(rows, valid, closes, write, closing)


@dataclass
class Flags:
    """How the cache stores things (constant for a runner)."""

    kv_fp8: bool  # the model rounds KV to FP8 values
    indexer_fp4: bool  # the model rounds indexer queries and keys to FP4 values
    packed: bool  # pools hold packed 584-byte FP8 entries


class DecodeGraph:
    """Plain decode steps of a `V4ModelRunner` over its model and cache pools, by blocks
    compiled on first use with the platform's `compile_options` (or run eagerly without
    them, which tests the same code cheaply). The runner sends everything else (prefill
    chunks, mixed steps, MTP drafts) down its general path."""

    def __init__(self, model: Transformer, pools: dict[str, torch.Tensor], block_size: int,
                 packed: bool, compile_options: dict | None = None) -> None:
        self.model, self.block_size = model, block_size
        self.flags = Flags(model.kv_fp8, model.indexer_fp4, packed)
        self.layer_pools = [
            {key: pools[f"{i}.{key}"] for key in POOL_KEYS if f"{i}.{key}" in pools}
            for i in range(len(model.layers))
        ]
        self.ratios = sorted({layer.ratio for layer in model.layers} - {0})
        self.min_entries = {4: max(model.args.index_topk, MIN_HCA_ENTRIES), 128: MIN_HCA_ENTRIES}
        self.block = decode_block
        self.compiled = compile_options is not None
        self.traced: set[str] = set()  # the kinds of step run so far (`step_kind`)
        if self.compiled:
            _check_torch_can_compile()
            # graphs per kind of block (ratio, hashed router) and per kind of step
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            self.block = torch.compile(decode_block, fullgraph=True, options=compile_options)

    def __call__(self, batch: RaggedBatch) -> torch.Tensor:
        """-> logits [B, vocab] float32 of a plain decode batch; the pools are updated.

        The first step of each kind (`step_kind`) compiles a graph per kind of block, with B
        and E symbolic, so no later step of that kind needs another. Those later steps run with
        dynamo checking only the guards that tell the graphs apart, not the hundreds on
        parameters and pools that cannot change (a check of a block's guards cost ~0.4 ms per
        call on a 2-core CPU, more than a fifth of the block)."""
        if not self.compiled:
            return self._step(batch)
        kind = step_kind(batch.num_tokens)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=kind in self.traced):
            logits = self._step(batch)
        self.traced.add(kind)
        return logits

    def _step(self, batch: RaggedBatch) -> torch.Tensor:
        m = self.model
        entries = {r: entry_rows(batch, r, self.block_size, self.min_entries[r])
                   for r in self.ratios}
        ids, positions, slots = batch.input_ids, batch.positions, batch.state_slots
        for rows in entries.values():
            for t in (rows.rows, rows.valid):  # one graph for every context length
                torch._dynamo.maybe_mark_dynamic(t, 1)
        x = m.embed(ids[None])[:, :, None, :].expand(-1, -1, m.args.hc_mult, -1).contiguous()
        if len(ids) > 1:  # one graph for every batch size above one
            torch._dynamo.maybe_mark_dynamic(x, 1)
            for t in [ids, positions, slots, *(t for r in entries.values() for t in
                                              (r.rows, r.valid, r.closes, r.write, r.closing))]:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        for layer, pools in zip(m.layers, self.layer_pools):
            x = self.block(layer, x, ids, positions, slots, entries.get(layer.ratio), pools,
                           m._inv_freq(layer.ratio), self.flags)
        return m._head(x, m, m.norm)[0]


def step_kind(num_requests: int) -> str:
    """Which graphs a decode step of this many requests runs: "one" (the shapes of a lone
    request), "few" (up to `GATHERED_MAX_TOKENS`: the experts, and on a CPU the matrix
    products, as fused loops over each request's rows) or "many" (BLAS products over every
    expert). The MoE's test of the token count is what gives "few" and "many" graphs of
    their own: dynamo guards on it."""
    if num_requests == 1:
        return "one"
    return "few" if num_requests <= moe.GATHERED_MAX_TOKENS else "many"


def step_kind_sizes() -> list[int]:
    """The smallest number of requests of each kind of step."""
    return [1, 2, moe.GATHERED_MAX_TOKENS + 1]


def _check_torch_can_compile() -> None:
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None or "skip_guard_eval_unsafe" not in inspect.signature(stance).parameters:
        raise ValueError(f"compile=True needs torch 2.7 or newer; this is torch "
                         f"{torch.__version__}. Upgrade torch, or run without compile.")


POOL_KEYS = ("window_kv", "compressed_kv", "compressor_kv", "compressor_score", "index_keys",
             "index_compressor_kv", "index_compressor_score")


def decode_block(layer: Block, x, ids, positions, slots, rows: EntryRows | None, pools: dict,
                 inv_freq, flags: Flags) -> torch.Tensor:
    """One block for B decode tokens: streams x [1, B, n, D] -> [1, B, n, D]."""
    h, post, comb = layer._pre(x, "attn")
    cos, sin = rope_cos_sin(positions, inv_freq)  # [B, rd/2]
    step = _Step(positions, slots, rows, pools, cos, sin, inv_freq, flags)
    x = hc_post(_attention(layer.attn, layer.attn_norm(h), step), x, post, comb)
    h, post, comb = layer._pre(x, "ffn")
    return hc_post(layer.ffn(layer.ffn_norm(h), ids[None]), x, post, comb)


@dataclass
class _Step:
    positions: torch.Tensor  # [B]
    slots: torch.Tensor  # [B] state slots
    rows: EntryRows | None
    pools: dict
    cos: torch.Tensor
    sin: torch.Tensor
    inv_freq: torch.Tensor
    flags: Flags


def _attention(attn, x: torch.Tensor, step: _Step) -> torch.Tensor:
    B, ratio, flags = x.shape[1], attn.ratio, step.flags
    cos, sin = step.cos, step.sin
    qr, q, kv = attn.project(x, cos, sin)  # [1, B, q_lora], [1, B, H, hd], [1, B, hd]
    q, kv = q[0], kv[0]
    keep = (lambda t: quantize_kv_nope(t, attn.rope_dim)) if flags.kv_fp8 else (lambda t: t)
    kv = keep(kv)
    window = step.pools["window_kv"]
    prior, prior_ok = _ring_read(window, step.slots, step.positions,
                                 window.shape[1] - 1)  # [B, W - 1, C]
    keys = [torch.cat([_read(prior, kv.dtype, flags.packed), kv[:, None]], dim=1)]
    valid = [torch.cat([prior_ok, prior_ok.new_ones(B, 1)], dim=1)]
    if ratio:
        new = _compress(attn.compressor, x, step, "compressor", lambda t: keep(t.to(kv.dtype)))
        entries = _entries(step.pools["compressed_kv"], step.rows, new, kv.dtype, flags.packed)
        seen = step.rows.valid  # [B, E]
        if ratio == 4:
            idx = attn.indexer
            to_key = quantize_indexer if flags.indexer_fp4 else (lambda t: t)
            new_key = _compress(idx.compressor, x, step, "index_compressor", to_key)
            ikeys = _entries(step.pools["index_keys"], step.rows, new_key, torch.float32, False)
            qi, w = idx.queries(x, qr, cos, sin, flags.indexer_fp4)  # [1, B, h, d], [1, B, h]
            relu = torch.relu(torch.einsum("bhd,bed->bhe", qi[0], ikeys))
            scores = torch.einsum("bhe,bh->be", relu, w[0]).masked_fill(~seen, float("-inf"))
            top = stable_topk(scores, idx.topk)  # [B, k]
            entries = entries.gather(1, top[..., None].expand(-1, -1, entries.shape[-1]))
            seen = seen.gather(1, top)
        keys.append(entries)
        valid.append(seen)
    groups = [(k, v[:, None]) for k, v in zip(keys, valid)]  # keys [B, K, C] for one query
    o = sparse_attention(q[:, None], groups, attn.attn_sink, attn.scale)[:, 0]  # [B, H, hd]
    _ring_write(window, step, kv, flags.packed)
    return attn.output(o, cos, sin)[None]  # [1, B, D]


def _compress(comp: Compressor, x, step: _Step, state: str, finish) -> torch.Tensor:
    """The windows that close at this token pooled -> [B, dim] (`finish` applied), computed
    only for the requests in `EntryRows.closing`, the other rows zero (a window closes once
    in `ratio` steps: pooling every request's window on every step cost 0.25-0.45 ms of a
    32-request step of the benchmark config on a 2-core EPYC for HCA, and ~1 ms for CSA's
    two compressors a layer: median step 8.2 -> 7.0 ms); every token's compressor rows go
    into the state rings."""
    ratio = comp.ratio
    kv, score = comp.project(x[0], step.positions)  # [B, (1 + overlap) * dim]
    ring_kv, ring_score = step.pools[f"{state}_kv"], step.pools[f"{state}_score"]
    size = ring_kv.shape[1]
    pick = step.rows.closing
    slots, positions = step.slots[pick], step.positions[pick]
    if size == ratio:
        # a ring of one window (HCA): once the token's rows are in, a closing token's window
        # is the whole ring in order (row r holds offset r), read as one block per request
        # with no per-row index
        _ring_write(ring_kv, step, kv)
        _ring_write(ring_score, step, score)
        rows_kv, rows_score = ring_kv[slots], ring_score[slots]  # [P, size, C]
        ok = torch.ones_like(rows_kv[..., 0], dtype=torch.bool)
    else:  # the positions p - size + 1 .. p, oldest first, read before this token's row goes in
        prior_kv, ok = _ring_read(ring_kv, slots, positions, size - 1)
        prior_score, _ = _ring_read(ring_score, slots, positions, size - 1)
        rows_kv = torch.cat([prior_kv, kv[pick, None]], dim=1)  # [P, size, C]
        rows_score = torch.cat([prior_score, score[pick, None]], dim=1)
        ok = torch.cat([ok, ok.new_ones(ok.shape[0], 1)], dim=1)
        _ring_write(ring_kv, step, kv)
        _ring_write(ring_score, step, score)
    pooled = comp.pool_rows(rows_kv, rows_score, ok)  # [P, dim]
    cos, sin = rope_cos_sin(positions - ratio + 1, step.inv_freq)  # the window's start
    new = finish(apply_rope(pooled, cos, sin))
    return new.new_zeros(len(step.positions), new.shape[-1]).index_put_((pick,), new)


def _ring_read(ring, slots, positions, num_rows: int):
    """Rows of positions p - num_rows .. p - 1 of each token's ring -> [N, num_rows, C], and
    whether each position exists (>= 0)."""
    size = ring.shape[1]
    pos = positions[:, None] + torch.arange(-num_rows, 0, device=ring.device)
    rows = slots[:, None] * size + pos % size
    return ring.view(-1, *ring.shape[2:])[rows], pos >= 0


def _ring_write(ring, step: _Step, values, packed: bool = False) -> None:
    size = ring.shape[1]
    if packed:
        values = pack_kv_fp8(values)
    ring.view(-1, *ring.shape[2:])[step.slots * size + step.positions % size] = \
        values.to(ring.dtype)


def _read(stored, dtype, packed: bool):
    return unpack_kv_fp8(stored, dtype) if packed else stored.to(dtype)


def _entries(pool, rows: EntryRows, new, dtype, packed: bool):
    """Store the new entry where a window closed, then read every request's entries
    [B, E, C] (the new one among them)."""
    flat = pool.view(-1, *pool.shape[2:])
    stored = pack_kv_fp8(new) if packed else new.to(pool.dtype)
    flat[rows.write] = torch.where(rows.closes[:, None], stored, flat[rows.write])
    return _read(flat[rows.rows], dtype, packed)
