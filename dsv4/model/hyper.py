"""Manifold-constrained hyper-connections (mHC): n residual streams instead of one.

Before a sub-block, the streams are mixed into its input with weights `pre`; after it, its
output is spread back with `post` and the old streams are mixed by `comb`, a matrix pushed
towards doubly-stochastic by Sinkhorn normalisation. All weights depend on the token.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from dsv4.model.norm import rms_normalize


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, S, n, D] -> per-token mixes [B, S, fn.shape[0]] in float32."""
    return rms_normalize(x.flatten(2), eps) @ fn.float().T


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Alternately normalise the columns and rows of comb [..., n, n] (columns first), `iters`
    times each, so it approaches a doubly-stochastic matrix.

    The matrices are tiny (4 x 4 per token) and the 2 * iters normalisations are sequential, so
    on a CPU the cost is dispatch, not arithmetic: this loop was a third of the torch ops of a
    decode step, and the same float32 steps in numpy take less than half of torch's time. That
    path is taken when nothing needs gradients; it gives the same bits
    (tests/test_model_hyper.py).
    """
    if comb.device.type == "cpu" and not (torch.is_grad_enabled() and comb.requires_grad):
        c = comb.float().numpy().copy()
        e = np.float32(eps)
        c /= c.sum(-2, keepdims=True) + e
        for _ in range(iters - 1):
            c /= c.sum(-1, keepdims=True) + e
            c /= c.sum(-2, keepdims=True) + e
        return torch.from_numpy(c)
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


@functools.lru_cache(maxsize=None)
def _scale_columns(n: int, device: torch.device) -> torch.Tensor:
    """Which of the three scales each of the 2n + n^2 mix columns takes. Made outside
    inference mode, so that training may use it after an inference call cached it."""
    with torch.inference_mode(False):
        return torch.tensor([0] * n + [1] * n + [2] * n * n, device=device)


def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
):
    """-> (sub-block input [B, S, D], post [B, S, n], comb [B, S, n, n])."""
    n = x.shape[2]
    mixes = hc_mixes(x, fn, norm_eps)
    # pre, post and comb logits scaled by scale[0], [1], [2] in one op, then cut apart; each
    # sigmoid runs on a contiguous copy, as torch's CPU kernel rounds strided input differently
    z = mixes * scale.float()[_scale_columns(n, mixes.device)] + base.float()
    pre = torch.sigmoid(z[..., :n].contiguous()) + hc_eps
    post = 2 * torch.sigmoid(z[..., n : 2 * n].contiguous())
    logits = z[..., 2 * n :].unflatten(-1, (n, n))
    comb = sinkhorn(torch.softmax(logits, dim=-1) + hc_eps, sinkhorn_iters, hc_eps)
    y = (pre[..., None] * x.float()).sum(dim=2)
    return y.to(x.dtype), post, comb


def hc_post(
    out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """y_k = post_k * out + sum_j comb[j, k] * residual_j  -> [B, S, n, D]."""
    mixed = torch.einsum("bsjk,bsjd->bskd", comb, residual.float())
    return (post[..., None] * out.float()[:, :, None, :] + mixed).to(residual.dtype)


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    hc_eps: float,
    norm_eps: float,
) -> torch.Tensor:
    """Collapse the streams for the output head (no Sinkhorn): [B, S, n, D] -> [B, S, D]."""
    mixes = hc_mixes(x, fn, norm_eps)
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return (pre[..., None] * x.float()).sum(dim=2).to(x.dtype)
