"""Fast paths against plain definitions: routed experts as grouped matmuls against the loop
over experts, fused attention over shared keys against explicit softmax math with a sink,
RoPE as a complex product against the pairwise rotation, row gathers against indexing."""

from __future__ import annotations

import pytest
import torch
from v4_oracle import tiny_args

from dsv4.model.attention import gather_rows, sparse_attention
from dsv4.model.moe import MoE
from dsv4.model.rope import apply_rope, rope_cos_sin


def _moe(hashed: bool, seed: int) -> MoE:
    torch.manual_seed(seed)
    args = tiny_args(n_routed_experts=8, num_experts_per_tok=3, hidden_size=64,
                     moe_intermediate_size=32)
    moe = MoE(args, hashed)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        if hashed:
            moe.gate.tid2eid.copy_(torch.randint(0, 8, moe.gate.tid2eid.shape))
    return moe


@pytest.mark.parametrize("hashed", [False, True])
# 1 and 2: most experts get no token (grouped_mm); 37: every expert gets a few rows (one
# batched product over padded rows); 300: over SMALL_GROUP rows each (grouped_mm)
@pytest.mark.parametrize("tokens", [1, 2, 37, 300])
def test_grouped_experts_match_the_loop_over_experts(hashed, tokens):
    moe = _moe(hashed, seed=tokens)
    x = torch.randn(1, tokens, 64)
    ids = torch.randint(0, moe.gate.tid2eid.shape[0] if hashed else 100, (1, tokens))
    with torch.no_grad():
        looped = moe(x, ids)
        weights = {k: v.clone() for k, v in moe.state_dict().items()}
        moe.stack_experts()
        grouped = moe(x, ids)
    assert moe._stacked
    if tokens == 37:  # MKL's batched product rounds a row differently from a lone product
        torch.testing.assert_close(grouped, looped, atol=1e-5, rtol=1e-5)
    else:  # grouped_mm multiplies each expert's rows as the loop does: the same bits
        assert torch.equal(grouped, looped)
    # the experts' parameters now view the stacked tensors: same names, same values
    state = moe.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert moe.experts[3].w2.weight.data_ptr() == moe._w2[3].data_ptr()


def test_training_after_stacking_runs_the_loop_and_gets_gradients():
    moe = _moe(False, seed=0)
    moe.stack_experts()
    x = torch.randn(1, 9, 64, requires_grad=True)
    moe(x, torch.zeros(1, 9, dtype=torch.long)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _softmax_with_sink(q, groups, sink, scale):
    """The definition, in float64: one softmax over every group's valid keys and the sink."""
    logits = [torch.einsum("bthd,bkd->bthk", q.double(), k.double()) * scale for k, _ in groups]
    logits = [s.masked_fill(~v[:, :, None, :], float("-inf")) for s, (_, v) in zip(logits, groups)]
    scores = torch.cat(logits, dim=-1)
    sinks = sink.double().view(1, 1, -1, 1).expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    keys = torch.cat([k.double() for k, _ in groups], dim=1)
    return torch.einsum("bthk,bkd->bthd", probs, keys)


def test_fused_attention_over_shared_keys_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 3, 5, 4, 32
    q = torch.randn(B, T, H, D, generator=g)
    band, entries = torch.randn(B, 9, D, generator=g), torch.randn(B, 6, D, generator=g)
    band_valid = torch.rand(1, T, 9, generator=g) < 0.6  # shared by the batch
    entry_valid = torch.rand(B, T, 6, generator=g) < 0.5
    band_valid[0, 0] = False  # a query that sees no window key...
    entry_valid[:, 0] = False  # ...nor any entry: only the sink
    sink = torch.randn(H, generator=g)
    groups = [(band, band_valid), (entries, entry_valid)]
    out = sparse_attention(q, groups, sink, D**-0.5)
    want = _softmax_with_sink(q, groups, sink, D**-0.5)
    assert out.dtype == torch.float32 and out.shape == (B, T, H, D)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, 0] == 0)
    # bf16 takes the einsum path (softmax in float32); it agrees to bf16's precision
    bf16 = sparse_attention(q.bfloat16(), [(k.bfloat16(), v) for k, v in groups], sink, D**-0.5)
    torch.testing.assert_close(bf16.double(), want, atol=0.05, rtol=0.05)


# one index for every sequence, an index per sequence, or an index per block of a sequence
@pytest.mark.parametrize("index_batch,seq", [(1, None), (3, None), (4, [2, 0, 2, 1])])
def test_gather_rows_picks_each_querys_rows_clamped_into_range(index_batch, seq):
    x = torch.randn(3, 7, 5, dtype=torch.bfloat16)
    index = torch.randint(-2, 10, (index_batch, 4, 6))  # -1 marks "none"; clamped like any
    got = gather_rows(x, index, None if seq is None else torch.tensor(seq))
    sequences = seq or range(3)
    assert got.shape == (len(sequences), 4, 6, 5)
    for m, b in enumerate(sequences):
        for t in range(4):
            for k in range(6):
                row = int(index[m % index_batch, t, k].clamp(0, 6))
                assert torch.equal(got[m, t, k], x[b, row])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_consecutive_pairs_of_the_last_dims_and_its_inverse_undoes_it(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 48, generator=g).to(dtype)  # [S, heads, dim], the last 16 rotate
    cos, sin = rope_cos_sin(torch.arange(100, 107), torch.rand(8, generator=g))
    out = apply_rope(x, cos[:, None], sin[:, None])
    a, b = x[..., 32::2].double(), x[..., 33::2].double()
    c, s = cos[:, None].double(), sin[:, None].double()
    want = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and torch.equal(out[..., :32], x[..., :32])
    torch.testing.assert_close(out[..., 32:].double(), want, atol=tol, rtol=tol)
    back = apply_rope(out, cos[:, None], -sin[:, None])
    torch.testing.assert_close(back.double(), x.double(), atol=2 * tol, rtol=2 * tol)


@pytest.fixture
def compiling(monkeypatch):
    """Take the branches that the model runs while torch.compile traces it (the forms inductor
    fuses), without compiling: cheap checks of the code a compiled graph is made from."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def test_traced_rope_is_the_pairwise_rotation(compiling):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 48, generator=g)
    cos, sin = rope_cos_sin(torch.arange(5), torch.rand(8, generator=g))
    traced = apply_rope(x, cos[:, None], sin[:, None])
    complex_form = torch.view_as_real(
        torch.view_as_complex(x[..., 32:].unflatten(-1, (-1, 2)))
        * torch.complex(cos[:, None], sin[:, None])).flatten(-2)
    torch.testing.assert_close(traced[..., 32:], complex_form, atol=1e-6, rtol=1e-6)
    assert torch.equal(traced[..., :32], x[..., :32])


def test_traced_sinkhorn_sums_over_axes_as_the_served_one_does(monkeypatch):
    from dsv4.model.hyper import sinkhorn

    comb = torch.softmax(torch.randn(9, 4, 4, generator=torch.Generator().manual_seed(2)), -1)
    served = sinkhorn(comb, 20, 1e-6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = sinkhorn(comb, 20, 1e-6)
    torch.testing.assert_close(traced, served, atol=1e-6, rtol=1e-5)
    assert torch.allclose(traced.sum(-2), torch.ones(9, 4), atol=1e-5)  # columns normalised last


@pytest.mark.parametrize("hashed", [False, True])
def test_traced_one_token_moe_reads_its_experts_in_place_with_the_loops_result(compiling,
                                                                                hashed):
    moe = _moe(hashed, seed=5)
    x, ids = torch.randn(1, 1, 64), torch.tensor([[7]])
    with torch.no_grad():
        looped = moe(x, ids)
        moe.stack_experts()
        gathered = moe(x, ids)  # one token while compiling: `_gathered`
    torch.testing.assert_close(gathered, looped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("tokens", [9, 37])
def test_traced_moe_of_many_tokens_pads_its_rows_in_the_graph_with_the_loops_result(
        compiling, hashed, tokens):
    """9 tokens leave some of the 8 experts idle; the hash table sends four tokens to expert 2
    in all three slots, so that expert gets more rows than there are tokens."""
    moe = _moe(hashed, seed=tokens)
    x = torch.randn(1, tokens, 64)
    ids = torch.randint(0, moe.gate.tid2eid.shape[0] if hashed else 100, (1, tokens))
    if hashed:
        moe.gate.tid2eid[ids[0, :4]] = 2
    with torch.no_grad():
        looped = moe(x, ids)
        moe.stack_experts()
        padded = moe(x, ids)  # more than GATHERED_MAX_TOKENS while compiling: `_padded`
    torch.testing.assert_close(padded, looped, atol=1e-5, rtol=1e-5)
