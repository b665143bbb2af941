"""Hybrid cache layout, byte sizes, slot mappings, fp8 entries, block manager bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv4.engine.block_manager import BlockManager
from dsv4.engine.kv_cache import (
    CacheSpec,
    KVCacheLayout,
    compressed_slot_mapping,
    plan_layout,
    window_slot_mapping,
)
from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams
from dsv4.quant.kv import pack_kv_fp8, unpack_kv_fp8

CONFIGS = Path(__file__).parent / "data" / "configs"
TINY = CacheSpec(num_hidden_layers=4, compress_ratios=(0, 4, 128, 4))


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"deepseek-v4-{name}.config.json").read_text())


def test_bytes_per_token_match_published_figures():
    # V4_SPEC section 4 (vLLM team's figures): Flash 6880 B/token, Pro 9848 B/token = 9.62 GiB @1M
    flash = CacheSpec.from_config(_config("flash"))
    pro = CacheSpec.from_config(_config("pro"))
    assert (len(flash.csa_layers), len(flash.hca_layers)) == (21, 20)
    assert flash.bytes_per_token == 6880
    assert pro.bytes_per_token == 9848
    assert round(pro.bytes_per_token * 2**20 / 2**30, 2) == 9.62
    assert CacheSpec.from_config(_config("flash"), "fp8").entry_bytes == 584


def test_bad_spec_values_are_named():
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        CacheSpec(num_hidden_layers=1, compress_ratios=(0,), kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="compress_ratios has 1 entries for 2 layers"):
        CacheSpec(num_hidden_layers=2, compress_ratios=(0,))


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_allocated_pools_have_the_accounted_bytes(dtype):
    spec = CacheSpec(num_hidden_layers=4, compress_ratios=(0, 4, 128, 4), kv_cache_dtype=dtype)
    layout = KVCacheLayout(spec, block_size=256, num_blocks=3, num_state_slots=2)
    pools = layout.allocate("cpu")
    assert sum(t.numel() * t.element_size() for t in pools.values()) == layout.total_bytes
    assert pools["1.compressed_kv"].shape[:2] == (3, 64)  # 256 tokens / 4
    assert pools["2.compressed_kv"].shape[:2] == (3, 2)  # 256 tokens / 128
    assert pools["1.index_keys"].shape == (3, 64, 128)
    assert pools["0.window_kv"].shape[:2] == (2, 128)
    assert pools["1.compressor_kv"].shape == (2, 8, 1024)  # overlapping ratio-4 window
    assert pools["2.compressor_kv"].shape == (2, 128, 512)
    assert "0.compressed_kv" not in pools and "2.index_keys" not in pools
    assert "mtp.0.window_kv" not in pools


def test_mtp_drafting_adds_one_window_ring_per_slot():
    plain = CacheSpec(num_hidden_layers=4, compress_ratios=(0, 4, 128, 4))
    drafting = CacheSpec(num_hidden_layers=4, compress_ratios=(0, 4, 128, 4), num_mtp_layers=1)
    assert drafting.state_bytes_per_slot - plain.state_bytes_per_slot == 128 * 512 * 2
    layout = KVCacheLayout(drafting, block_size=128, num_blocks=3, num_state_slots=2)
    pools = layout.allocate("cpu")
    assert pools["mtp.0.window_kv"].shape == (2, 128, 512)
    assert sum(t.numel() * t.element_size() for t in pools.values()) == layout.total_bytes


def test_plan_layout_balances_pools_for_the_reference_length():
    per_seq = TINY.state_bytes_per_slot + 8 * 128 * TINY.bytes_per_token  # 1024-token request
    layout = plan_layout(TINY, int(per_seq * 5), max_num_seqs=64, reference_seq_len=1024)
    assert layout.num_state_slots == 5
    assert layout.num_blocks == 40  # 5 requests x 8 blocks: both pools fill together
    assert layout.total_bytes <= per_seq * 5
    capped = plan_layout(TINY, int(per_seq * 5), max_num_seqs=2, reference_seq_len=1024)
    assert capped.num_state_slots == 2 and capped.num_blocks > 40
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=1000 is too small"):
        plan_layout(TINY, 1000, max_num_seqs=4, reference_seq_len=1024)


def test_slot_mappings():
    positions = torch.arange(0, 300)
    slots = window_slot_mapping(torch.full_like(positions, 3), positions, 128)
    assert slots[0] == 3 * 128 and slots[128] == 3 * 128 and slots[299] == 3 * 128 + 43
    tables = torch.tensor([[7, 2, 5, -1]])
    seq = torch.zeros_like(positions)
    csa = compressed_slot_mapping(tables, seq, positions, ratio=4, block_size=128)
    # token 3 closes entry 0 (block 7, row 0); token 131 closes entry 32 = block 2, row 0
    assert csa[3] == 7 * 32 and csa[7] == 7 * 32 + 1 and csa[131] == 2 * 32
    assert csa[299] == 5 * 32 + (74 % 32)
    assert (csa[positions % 4 != 3] == -1).all()
    hca = compressed_slot_mapping(tables, seq, positions, ratio=128, block_size=128)
    assert hca[127] == 7 and hca[255] == 2 and (hca != -1).sum() == 2


def test_fp8_entries_round_trip():
    torch.manual_seed(0)
    kv = torch.randn(4, 3, 512) * torch.logspace(-3, 2, 3)[None, :, None]
    packed = pack_kv_fp8(kv)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 3, 584)
    back = unpack_kv_fp8(packed).float()
    # RoPE dims are stored bf16, exactly as a bf16 cast
    assert torch.equal(back[..., 448:], kv[..., 448:].bfloat16().float())
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each 64-block's max
    blocks = kv[..., :448].reshape(4, 3, 7, 64)
    err = (back[..., :448] - kv[..., :448]).reshape(4, 3, 7, 64).abs().amax(-1)
    assert (err <= blocks.abs().amax(-1) * 2**-3).all()
    # scale bytes are ue8m0 biased exponents
    assert (packed[..., 576:583] > 100).all() and (packed[..., 583] == 0).all()


def _req(rid: str, n_prompt: int) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=4))


def test_block_manager_accounting_and_exhaustion():
    layout = KVCacheLayout(TINY, block_size=128, num_blocks=5, num_state_slots=2)
    bm = BlockManager(layout)
    a, b, c = _req("a", 10), _req("b", 10), _req("c", 10)
    assert bm.can_admit(a, 300)
    bm.allocate_slot(a)
    assert bm.grow(a, 300) == [0, 1, 2]
    assert bm.grow(a, 384) == [] and bm.num_free_blocks == 2
    bm.allocate_slot(b)
    assert not bm.can_grow(b, 3 * 128 + 1)
    with pytest.raises(RuntimeError, match="needs 3 blocks, 2 free"):
        bm.grow(b, 300)
    bm.grow(b, 256)
    assert bm.num_free_blocks == 0 and not bm.can_admit(c, 1)  # no slot, no block
    bm.free(a)
    bm.free(a)  # second free finds nothing to return
    assert bm.num_free_blocks == 3 and bm.num_free_slots == 1 and a.block_table == []
    # a request claiming blocks it does not own is refused, not double-freed
    c.block_table = list(b.block_table)
    with pytest.raises(RuntimeError, match="not owned by request c"):
        bm.free(c)
    bm.free(b)
    assert bm.num_free_blocks == 5 and bm.num_free_slots == 2 and bm.usage == 0.0
