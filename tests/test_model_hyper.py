from __future__ import annotations

import pytest
import torch

from dsv4.model.hyper import sinkhorn


@pytest.mark.parametrize("tokens", [1, 5, 300, 700])
def test_sinkhorn_inference_path_gives_the_same_bits_as_the_autograd_path(tokens):
    g = torch.Generator().manual_seed(tokens)
    comb = torch.softmax(torch.randn(2, tokens, 4, 4, generator=g) * 3, dim=-1) + 1e-6
    trained = comb.clone().requires_grad_()
    with_grad = sinkhorn(trained, 20, 1e-6)  # the autograd Function training runs
    with torch.inference_mode():
        served = sinkhorn(comb, 20, 1e-6)  # the plain call the engine makes
    assert with_grad.requires_grad and not served.requires_grad
    assert served.dtype == torch.float32 and served.shape == comb.shape
    assert torch.equal(served, with_grad.detach())
    # columns were normalised last; rows are near 1 after 20 rounds
    assert torch.allclose(served.sum(-2), torch.ones(2, tokens, 4), atol=1e-5)
    assert torch.allclose(served.sum(-1), torch.ones(2, tokens, 4), atol=0.05)


def _plain_sinkhorn(c, iters, eps):
    """The textbook loop, differentiated by autograd: what the closed-form backward replaces."""
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


@pytest.mark.parametrize("tokens", [1, 300, 700])  # 1,400 matrices: the torch path
def test_sinkhorn_matches_the_plain_loop_and_its_autograd_gradient(tokens):
    g = torch.Generator().manual_seed(tokens)
    comb = torch.softmax(torch.randn(2, tokens, 4, 4, generator=g) * 3, dim=-1) + 1e-6
    upstream = torch.randn(2, tokens, 4, 4, generator=g)
    ours, plain = comb.clone().requires_grad_(), comb.clone().requires_grad_()
    out = sinkhorn(ours, 20, 1e-6)
    want = _plain_sinkhorn(plain, 20, 1e-6)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, plain.grad, rtol=1e-4, atol=1e-4)


def test_sinkhorn_backward_passes_gradcheck():
    comb = torch.rand(1, 3, 4, 4, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, 5, 1e-6), (comb.requires_grad_(),))


@pytest.mark.parametrize("tokens", [1, 17, 300])
def test_hc_pre_gives_the_bits_of_the_per_gate_formula(tokens):
    """hc_pre scales all mixes in one op; pre, post and comb must keep the bits of scaling
    each gate's slice on its own (a sigmoid over a strided slice rounds differently on CPU)."""
    from dsv4.model.hyper import hc_mixes, hc_pre

    g = torch.Generator().manual_seed(tokens)
    n = 4
    x = torch.randn(1, tokens, n, 64, generator=g)
    fn, base = torch.randn(24, 256, generator=g) * 0.1, torch.randn(24, generator=g)
    scale = torch.rand(3, generator=g) + 0.5
    mixes = hc_mixes(x, fn, 1e-6)
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + 1e-6
    post = 2 * torch.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    logits = mixes[..., 2 * n :].unflatten(-1, (n, n)) * scale[2] + base[2 * n :].view(n, n)
    comb = sinkhorn(torch.softmax(logits, dim=-1) + 1e-6, 20, 1e-6)
    y = (pre[..., None] * x).sum(dim=2)
    for got, want in zip(hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6), (y, post, comb)):
        assert torch.equal(got, want)
