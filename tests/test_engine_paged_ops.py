"""Paged cache reads/writes over chunked, ragged batches equal the dense (whole-sequence) view.

Each token's cache rows are distinct random vectors keyed by (request, position); after every
step of a real schedule (any chunk sizes, prefills mixed with decodes, preemption) the context
read back from the rings and pools must be exactly the rows of the right positions.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.engine.batch import build_batch
from dsv4.engine.block_manager import BlockManager
from dsv4.engine.kv_cache import CacheSpec, KVCacheLayout
from dsv4.engine.paged_ops import (
    compressed_visibility,
    gather_compressed,
    query_blocks,
    ring_context,
    window_band,
    write_compressed,
    write_ring,
)
from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.scheduler import Scheduler
from dsv4.quant.kv import pack_kv_fp8, unpack_kv_fp8

WINDOW = 8
MAX_LEN = 400


def _run(prompt_lens, budget, fp8=False, num_blocks=16, max_tokens=3):
    # the fp8 entry format is V4's (512 channels, 64 RoPE); bf16 runs use a narrow toy width
    DIM = 512 if fp8 else 64
    SPEC = CacheSpec(
        num_hidden_layers=2,
        compress_ratios=(0, 4),
        sliding_window=WINDOW,
        head_dim=DIM,
        kv_cache_dtype="fp8" if fp8 else "bf16",
    )
    torch.manual_seed(0)
    n = len(prompt_lens)
    kv = torch.randn(n, MAX_LEN, DIM)  # window row of (request, position)
    comp = torch.randn(n, MAX_LEN // 4, DIM)  # compressed entry of (request, entry index)
    kvc = torch.randn(n, MAX_LEN, 2 * DIM)  # compressor input row (overlap: 2 x DIM channels)
    if fp8:  # compare against what the fp8 format can represent
        kv = unpack_kv_fp8(pack_kv_fp8(kv)).float()
        comp = unpack_kv_fp8(pack_kv_fp8(comp)).float()
    layout = KVCacheLayout(SPEC, block_size=128, num_blocks=num_blocks, num_state_slots=n)
    sched = Scheduler(BlockManager(layout), n, budget, MAX_LEN)
    reqs = [
        Request(f"r{i}", [3] * L, SamplingParams(max_tokens=max_tokens))
        for i, L in enumerate(prompt_lens)
    ]
    for r in reqs:
        sched.add_request(r)
    index = {r.request_id: i for i, r in enumerate(reqs)}
    pools = layout.allocate("cpu")
    ring, cpool = pools["0.window_kv"], pools["1.compressed_kv"]
    cstate = pools["1.compressor_kv"]  # [slots, 8, 2 * DIM] fp32 ring
    if not fp8:
        ring, cpool = ring.float(), cpool.float()
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        batch = build_batch(out, layout).to("cpu")
        rid = torch.tensor([index[s.request.request_id] for s in out.scheduled])
        tok_req = rid[batch.seq_index]  # [T]
        fresh = kv[tok_req, batch.positions]  # [T, DIM]
        # window: every token sees exactly positions p-7..p of its own request
        ctx, valid = ring_context(ring, fresh, batch, fp8=fp8)
        want_pos = batch.positions[:, None] + torch.arange(-WINDOW + 1, 1)[None, :]
        assert torch.equal(valid, want_pos >= 0)
        want = kv[tok_req[:, None], want_pos.clamp(min=0)] * valid[..., None]
        assert torch.equal(ctx.float() * valid[..., None], want)  # invalid rows: junk
        # the same keys through blocks of queries sharing one band (how prefill reads them)
        for size in (1, 4, 64):
            blocks = query_blocks(batch, size, torch.ones(len(out.scheduled), dtype=torch.bool))
            assert torch.equal(blocks.tokens, torch.arange(batch.num_tokens))
            flat_pos = blocks.positions.flatten()[blocks.slot]
            assert torch.equal(flat_pos, batch.positions)  # every token lands in its slot
            band, ok = window_band(ring, fresh, batch, blocks, fp8=fp8)  # [NB, K], [NB, s, K]
            per_token = ok.flatten(0, 1)[blocks.slot]  # [T, K]
            assert torch.equal(per_token.sum(1), valid.sum(1))  # same number of keys...
            rows = band[blocks.slot // size]  # ...and the same rows, oldest first
            got = rows[per_token[..., None].expand_as(rows)].view(-1, DIM)
            assert torch.equal(got.float(), ctx[valid].float())
        write_ring(ring, fresh, batch, fp8=fp8)
        # compressed: closing tokens write their entry, then all visible entries read back
        slots = batch.compressed_slot_mapping[4]
        closing = slots >= 0
        # compressor: a closing token pools positions p-7..p (previous + own window of 4)
        ctx_c, valid_c = ring_context(
            cstate, kvc[tok_req, batch.positions], batch, token_idx=closing.nonzero().squeeze(1)
        )
        want_pos = batch.positions[closing][:, None] + torch.arange(-7, 1)[None, :]
        want = kvc[tok_req[closing][:, None], want_pos.clamp(min=0)] * (want_pos >= 0)[..., None]
        assert torch.equal(valid_c, want_pos >= 0)
        assert torch.equal(ctx_c * valid_c[..., None], want)
        write_ring(cstate, kvc[tok_req, batch.positions], batch)
        write_compressed(
            cpool, slots, comp[tok_req[closing], batch.positions[closing] // 4], fp8=fp8
        )
        entries, evalid = gather_compressed(cpool, batch, 4, 128, fp8=fp8)
        for b in range(len(out.scheduled)):
            k = int(batch.seq_lens[b]) // 4
            assert torch.equal(entries[b, :k].float(), comp[rid[b], :k])
            assert not evalid[b, k:].any()
        vis = compressed_visibility(batch, 4, entries.shape[1])
        assert torch.equal(vis.sum(1), (batch.positions + 1) // 4)
        sched.update_from_output(
            out, {s.request.request_id: [(7, None)] for s in out.scheduled if s.samples}
        )
        steps += 1
    return sched, steps


@pytest.mark.parametrize("chunk", [1, 3, 5, 64, 127])
def test_single_request_any_chunk_size(chunk):
    _run([301], budget=chunk)


@pytest.mark.parametrize("fp8", [False, True])
def test_ragged_mixed_batches(fp8):
    _run([37, 300, 5, 129, 64], budget=41, fp8=fp8)


def test_after_preemption_the_cache_is_rebuilt_correctly():
    sched, _ = _run([250, 250, 250], budget=512, num_blocks=6, max_tokens=12)
    assert sched.num_preemptions > 0
