"""FP8 / FP4 formats checked against implementations nobody here wrote: torch's own float8
types and the `ml_dtypes` package's float4_e2m1fn (torch has no CPU cast for float4)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from dsv4.quant import act, fp4, fp8, kv
from dsv4.quant.scales import pow2_scale


def test_e2m1_table_matches_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    reference = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert torch.equal(fp4.e2m1_table(), torch.from_numpy(reference))


def test_e2m1_rounding_matches_ml_dtypes_including_ties():
    grid = torch.linspace(-7, 7, 2801)  # step 0.005 hits every tie (0.25, 0.75, 1.25, ... 5)
    ours = fp4.e2m1_table()[fp4.encode_e2m1(grid).long()]
    reference = grid.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert torch.equal(ours, torch.from_numpy(reference))


def test_fp4_packing_low_nibble_is_even_input():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 1.0, -6.0  # codes 2 and 15 with a scale of 1 (amax 6)
    packed, scale = fp4.quantize_fp4(w)
    assert scale.float().item() == 1.0
    assert packed.view(torch.uint8)[0, 0].item() == 2 | (15 << 4)


def test_fp4_roundtrip_error_and_scales():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    packed, scale = fp4.quantize_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (64, 128)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (64, 8)
    back = fp4.dequantize_fp4(packed, scale)
    # every block's amax lands in (3, 6] after scaling, so the step is at most 2 * scale / 2
    err = (back - w).abs().view(64, 8, 32).amax(-1)
    assert torch.all(err <= scale.float())
    # values on the grid survive exactly
    exact = fp4.e2m1_table()[torch.randint(0, 16, (4, 64))] * 0.25
    exact[:, 0] = 1.5  # pins each block's amax so its scale is 0.25
    exact[:, 32] = 1.5
    assert torch.equal(fp4.dequantize_fp4(*fp4.quantize_fp4(exact)), exact)


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (7, 129)])
def test_fp8_block_roundtrip_agrees_with_torch_float8(shape):
    torch.manual_seed(1)
    w = torch.randn(*shape) * 3
    q, scale = fp8.quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert scale.dtype == torch.float8_e8m0fnu
    # scales are powers of two and every block fits e4m3's range
    s = scale.float()
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    back = fp8.dequantize_fp8_block(q, scale)
    full_scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert torch.all((w / full_scale).abs() <= 448)
    # decoding agrees with torch's own e4m3 decoding of the same codes
    assert torch.equal(back, q.float() * full_scale)
    assert torch.equal(q, (w / full_scale).to(torch.float8_e4m3fn))
    assert ((back - w).abs() <= full_scale * 16).all()  # half an e4m3 step at the top binade


def test_fp8_scale_shape_mismatch_is_named():
    q, scale = fp8.quantize_fp8_block(torch.randn(256, 256))
    with pytest.raises(ValueError, match="scale has shape"):
        fp8.dequantize_fp8_block(q, scale[:1])


def test_pow2_scale_is_smallest_fitting_power():
    amax = torch.tensor([448.0, 449.0, 1.0, 0.0])
    assert pow2_scale(amax, 448).tolist() == [1.0, 2.0, 2.0**-8, 2.0**-22]


def test_fp8_roundtrip_matches_torch_cast_per_block():
    torch.manual_seed(2)
    x = torch.randn(5, 448) * 10
    y = act.fp8_roundtrip(x, 64)
    blocks = x.view(5, 7, 64)
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True), 448)
    expected = ((blocks / scale).to(torch.float8_e4m3fn).float() * scale).view(5, 448)
    assert torch.equal(y, expected)
    assert (y - x).abs().max() < 0.07 * x.abs().max()


def test_fp4_roundtrip_uses_e2m1_grid():
    torch.manual_seed(3)
    x = torch.randn(4, 128)
    y = act.fp4_roundtrip(x, 32)
    scale = pow2_scale(x.view(4, 4, 32).abs().amax(-1, keepdim=True), 6.0)
    on_grid = (y.view(4, 4, 32) / scale).numpy()
    reference = (x.view(4, 4, 32) / scale).numpy().astype(ml_dtypes.float4_e2m1fn)
    assert np.array_equal(on_grid, reference.astype(np.float32))


def test_hadamard_is_orthonormal_and_matches_matrix():
    n = 16
    h = torch.tensor([[1.0]])
    while h.shape[0] < n:  # Sylvester construction, written out here
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, n)
    assert torch.allclose(act.hadamard_rotate(x), x @ h.T / n**0.5, atol=1e-6)
    q, k = torch.randn(n), torch.randn(n)
    assert torch.allclose(act.hadamard_rotate(q) @ act.hadamard_rotate(k), q @ k, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        act.hadamard_rotate(torch.randn(12))
    # a row's rotation does not depend on the rows rotated with it (V4's indexer: n = 128)
    rows = torch.randn(300, 128)
    assert torch.equal(act.hadamard_rotate(rows)[:7], act.hadamard_rotate(rows[:7]))


def test_constants_cached_in_inference_mode_still_serve_training():
    """The e2m1 tables and mHC scale columns are cached on first use; an engine run
    (inference mode) must not leave autograd-unusable tensors for a later training run."""
    from dsv4.model.hyper import hc_pre

    def mhc_and_indexer_quant(x, scale):
        h, post, comb = hc_pre(x, torch.randn(24, 4 * 64), torch.zeros(24), scale, 3, 1e-6, 1e-6)
        return act.fp4_roundtrip(act.hadamard_rotate(h)).sum() + post.sum() + comb.sum()

    with torch.inference_mode():
        mhc_and_indexer_quant(torch.randn(1, 2, 4, 64), torch.ones(3))
    x = torch.randn(1, 2, 4, 64, requires_grad=True)
    scale = torch.ones(3, requires_grad=True)
    mhc_and_indexer_quant(x, scale).backward()
    assert x.grad is not None and scale.grad is not None


def test_kv_fp8_entry_is_584_bytes_and_equals_the_qat_numerics():
    assert kv.KV_FP8_ENTRY_BYTES == 584
    torch.manual_seed(4)
    x = torch.randn(2, 3, 512) * 5
    packed = kv.pack_kv_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 584)
    expected = torch.cat([act.fp8_roundtrip(x[..., :448], 64),
                          x[..., 448:].to(torch.bfloat16).float()], -1)
    assert torch.equal(kv.unpack_kv_fp8(packed, torch.float32), expected)
    assert torch.all(packed[..., 583] == 0)  # padding byte
