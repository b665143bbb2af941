"""The CPU kernels (dsv4/platforms/cpu_kernels.cpp) against exact products, and the MoE and
the model through them against torch's products. Skipped where the CPU has no AVX-512 BF16
(the kernels are then never used); the build's failure path runs everywhere."""

from __future__ import annotations

import pytest
import torch
from v4_oracle import tiny_args

from dsv4.model import fusion
from dsv4.model.moe import MoE
from dsv4.model.transformer import Transformer
from dsv4.platforms import cpu_kernels

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.can_pack(torch.zeros(1, 64, 2, dtype=torch.bfloat16)),
    reason="no AVX-512 BF16, or AMX, or no C++ compiler: the kernels are not used here")


def _exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 rows times bf16 weights [N, K] in float64: the sums the kernel rounds once."""
    return x.double() @ w.double().T


def _assert_within_one_rounding(got: torch.Tensor, exact: torch.Tensor) -> None:
    # half a bf16 step, plus room for the float32 sum's own error (~1e-5 here)
    step = exact.abs() * 2.0**-8 + 1e-3
    assert got.dtype == torch.bfloat16
    assert torch.all((got.double() - exact).abs() <= step), (got.double() - exact).abs().max()


def _torch_swiglu(x, w13, scale, limit):
    """The experts' SwiGLU as torch's bf16 ops compute it (MoE's `_swiglu`)."""
    gate, up = (x @ w13.transpose(-1, -2)).chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return torch.nn.functional.silu(gate) * up * scale


@needs_kernel
@pytest.mark.parametrize("limit", [None, 0.7])  # 0.7: clamps many of the gate and up values
def test_padded_experts_run_each_experts_own_rows(limit):
    g = torch.Generator().manual_seed(0)
    E, C, D, inter = 5, 16, 128, 96
    w13 = (torch.randn(E, 2 * inter, D, generator=g) * 0.2).bfloat16()  # w1's rows, w3's
    w2 = (torch.randn(E, D, inter, generator=g) * 0.2).bfloat16()
    rows = torch.randn(E, C, D, generator=g).bfloat16()
    scale = torch.rand(E, C, 1, generator=g).bfloat16()
    counts = torch.tensor([0, 1, 6, 13, 16])  # none, a remainder tile, whole tiles, both
    out = cpu_kernels.padded_experts(rows, scale, counts, cpu_kernels.pack_gate_up(w13),
                                     cpu_kernels.pack(w2), limit)
    assert out.shape == (E, C, D)
    for e, n in enumerate(counts.tolist()):
        want = _torch_swiglu(rows[e, :n], w13[e], scale[e, :n], limit) @ w2[e].T
        torch.testing.assert_close(out[e, :n], want, atol=2e-2, rtol=2e-2)
    with pytest.raises(RuntimeError, match="expert 2 has 17 rows, outside"):
        cpu_kernels.padded_experts(rows, scale, torch.tensor([0, 1, 17, 1, 1]),
                                   cpu_kernels.pack_gate_up(w13), cpu_kernels.pack(w2), limit)


@needs_kernel
def test_sorted_rows_take_consecutive_rows_per_expert():
    g = torch.Generator().manual_seed(1)
    E, K, N = 4, 64, 128
    w = torch.randn(E, N, K, generator=g).bfloat16()
    counts = torch.tensor([7, 0, 300, 2])  # none, a remainder tile, many whole ones
    x = torch.randn(int(counts.sum()), 2 * K, generator=g).bfloat16()[:, :K]  # strided rows
    out = cpu_kernels.experts_matmul(x, counts, cpu_kernels.pack(w))
    first = 0
    for e, n in enumerate(counts.tolist()):
        _assert_within_one_rounding(out[first:first + n], _exact(x[first:first + n], w[e]))
        first += n


@needs_kernel
@pytest.mark.parametrize("limit", [None, 0.7])
def test_fused_swiglu_matches_torchs_ops_on_the_products(limit):
    g = torch.Generator().manual_seed(2)
    E, K, inter = 3, 128, 96
    w13 = (torch.randn(E, 2 * inter, K, generator=g) * 0.2).bfloat16()
    counts = torch.tensor([9, 0, 4])
    x = torch.randn(13, K, generator=g).bfloat16()
    scale = torch.rand(13, 1, generator=g).bfloat16()
    h = cpu_kernels.experts_swiglu(x, counts, cpu_kernels.pack_gate_up(w13), scale, limit)
    assert h.shape == (13, inter)
    for e, rows in ((0, slice(0, 9)), (2, slice(9, 13))):
        want = _torch_swiglu(x[rows], w13[e], scale[rows], limit)
        torch.testing.assert_close(h[rows], want, atol=1e-2, rtol=1e-2)


@needs_kernel
def test_rows_of_the_wrong_dtype_shape_or_count_are_refused_by_name():
    packed = cpu_kernels.pack(torch.zeros(2, 64, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"\[rows, 32\] bf16 rows"):
        cpu_kernels.experts_matmul(torch.zeros(4, 32), torch.tensor([1, 1]), packed)
    with pytest.raises(ValueError, match=r"\[rows, 32\] bf16 rows"):
        cpu_kernels.experts_matmul(torch.zeros(4, 16, dtype=torch.bfloat16),
                                   torch.tensor([1, 1]), packed)
    rows = torch.zeros(4, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="as `pack` returns them"):
        cpu_kernels.experts_matmul(rows, torch.tensor([1, 1]), packed.transpose(-1, -2))
    with pytest.raises(ValueError, match="as `pack` returns them"):
        cpu_kernels.experts_matmul(rows, torch.tensor([1, 1]), packed.float())
    for counts in ([3, 2], [1, -1], [1, 1, 1]):  # past the rows, negative, an expert too many
        with pytest.raises(ValueError, match="do not fit rows"):
            cpu_kernels.experts_matmul(rows, torch.tensor(counts), packed)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 128), (9, 128), (3, 100, 128)])
def test_linear_is_f_linear(shape):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(192, 128, generator=g).bfloat16()
    x = torch.randn(*shape[:-1], 256, generator=g).bfloat16()[..., ::2]  # strided rows
    assert cpu_kernels.can_pack(w)
    out = cpu_kernels.linear(x, cpu_kernels.pack(w))
    assert out.shape == (*shape[:-1], 192)
    _assert_within_one_rounding(out.flatten(0, -2), _exact(x.flatten(0, -2), w))


def _ran_kernel(fn) -> bool:
    with torch.profiler.profile() as prof:
        fn()
    return any(e.key == "dsv4_cpu::linear" for e in prof.key_averages())


@needs_kernel
def test_linear_leaves_a_compiled_graphs_few_rows_to_inductor(monkeypatch):
    w = torch.randn(64, 32).bfloat16()
    packed = fusion.packed_for_kernels(w)
    assert packed is not None
    few, many = torch.randn(3, 32).bfloat16(), torch.randn(9, 32).bfloat16()
    assert _ran_kernel(lambda: fusion.linear(few, w, packed))  # eagerly, every size
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _ran_kernel(lambda: fusion.linear(few, w, packed))  # fused loops there
    assert _ran_kernel(lambda: fusion.linear(many, w, packed))
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    assert not _ran_kernel(lambda: fusion.linear(many, w, packed))


@needs_kernel
def test_bf16_model_through_the_kernels_gives_torchs_logits(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.bfloat16()
    ids = torch.randint(0, model.args.vocab_size, (2, 21))
    with torch.inference_mode():
        model.fuse_projections()
        assert model._head_packed is not None and model.layers[0].attn._wo_b_packed is not None
        kernels = model.score(ids)
        monkeypatch.setattr(cpu_kernels, "enabled", False)
        torchs = model.score(ids)
    torch.testing.assert_close(kernels, torchs, atol=2e-2, rtol=2e-2)


def _bf16_moe(seed: int) -> MoE:
    torch.manual_seed(seed)
    args = tiny_args(n_routed_experts=8, num_experts_per_tok=2, hidden_size=128,
                     moe_intermediate_size=64)
    moe = MoE(args, hashed=False)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    moe.bfloat16()
    moe.stack_experts()
    return moe


@needs_kernel
@pytest.mark.parametrize("compiling,tokens", [(False, 3), (False, 200), (True, 37)])
def test_moe_through_the_kernel_matches_torchs_products(monkeypatch, compiling, tokens):
    """Sorted rows (eager: `grouped_experts`) and padded rows (the branch a compiled graph of
    many tokens takes: `padded_experts`), with the kernel and without."""
    moe = _bf16_moe(seed=tokens)
    assert moe._w13_packed is not None and moe._w2_packed is not None
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, ids = torch.randn(1, tokens, 128).bfloat16(), torch.randint(0, 100, (1, tokens))
    with torch.no_grad():
        kernel = moe(x, ids)
        monkeypatch.setattr(cpu_kernels, "enabled", False)
        torchs = moe(x, ids)
    # the same sums rounded at the same points; equal bits on CPUs where oneDNN also adds
    # pairs of products in order, to bf16's rounding elsewhere
    torch.testing.assert_close(kernel, torchs, atol=2e-2, rtol=2e-2)


def test_a_failed_build_warns_and_leaves_torchs_products(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_cpu_gains", lambda: True)
    cpu_kernels._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the CPU kernels"):
            assert not cpu_kernels.can_pack(torch.zeros(2, 64, 32, dtype=torch.bfloat16))
        moe = _bf16_moe(seed=0)
        moe.shared_experts.fuse_projections()
        assert moe._w13_packed is None  # the MoE runs torch's products
        assert moe.shared_experts._w13_packed is None
    finally:
        cpu_kernels._library.cache_clear()  # later tests build (or find) the real kernel
