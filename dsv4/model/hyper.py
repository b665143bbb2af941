"""Manifold-constrained hyper-connections (mHC): n residual streams instead of one.

Before a sub-block, the streams are mixed into its input with weights `pre`; after it, its
output is spread back with `post` and the old streams are mixed by `comb`, a matrix pushed
towards doubly-stochastic by Sinkhorn normalisation. All weights depend on the token.
"""

from __future__ import annotations

import functools

import torch

from dsv4.model.norm import rms_normalize


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, S, n, D] -> per-token mixes [B, S, fn.shape[0]] in float32."""
    return rms_normalize(x.flatten(2), eps) @ fn.float().T


@functools.cache
def _spreaders(n: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """0/1 matrices [n*n, n*n] for stacks of n x n matrices flattened row-major to [N, n*n]:
    x @ cols puts in every entry the sum of its column, x @ rows the sum of its row. One tiny
    matmul does what a sum over a 4-long axis plus a broadcast do, and does it faster (numpy's
    sum over such an axis took 130 us for 1024 tokens, this matmul 22 us). Made outside
    inference mode, so that training may use them after an inference call cached them."""
    with torch.inference_mode(False):
        eye = torch.eye(n, dtype=dtype, device=device)
        ones = torch.ones(n, n, dtype=dtype, device=device)
        return torch.kron(ones, eye), torch.kron(eye, ones)


def _normalise(c, spreaders, iters: int, eps: float, trail: list | None = None):
    """Divide the matrices of c [N, n*n] by their column sums, then by row and column sums
    alternately: 2 * iters - 1 divisions. c is a numpy array or a torch tensor, spreaders the
    matching (cols, rows) of `_spreaders`; each step's (result, divisor) goes to `trail`."""
    for step in range(2 * iters - 1):
        divisor = c @ spreaders[step % 2] + eps
        c = c / divisor
        if trail is not None:
            trail.append((c, divisor))
    return c


# Up to this many matrices, numpy on a CPU (see `sinkhorn`); beyond, torch. numpy's OpenBLAS
# runs larger products on threads of its own, which fought torch's for the cores: with numpy
# at every size, 32 requests through the engine (prefill chunks of 2,048 tokens) ran 20%
# slower, and 5% faster with OPENBLAS_NUM_THREADS=1.
NUMPY_MAX_MATRICES = 1024


@functools.cache
def _numpy_spreaders(n: int, dtype: torch.dtype) -> tuple:
    return tuple(m.numpy() for m in _spreaders(n, dtype, torch.device("cpu")))


def _as_arrays(comb: torch.Tensor) -> tuple:
    """(comb as [N, n*n], its spreaders): numpy on a CPU for small N, torch otherwise."""
    n = comb.shape[-1]
    flat = comb.detach().reshape(-1, n * n)
    if comb.device.type == "cpu" and len(flat) <= NUMPY_MAX_MATRICES:
        return flat.numpy(), _numpy_spreaders(n, comb.dtype)
    return flat, _spreaders(n, comb.dtype, comb.device)


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn with a hand-written backward. Autograd through the loop records ~4 ops per
    division; here each division's backward is one expression: for c' = c / d with
    d = sum(c) + eps over the normalised axis, dc = (dc' - sum(dc' * c')) / d."""

    @staticmethod
    def forward(ctx, comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        c, ctx.spreaders = _as_arrays(comb)
        ctx.trail = []
        out = _normalise(c, ctx.spreaders, iters, eps, ctx.trail)
        return torch.as_tensor(out, device=comb.device).view(comb.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g, _ = _as_arrays(grad.contiguous())
        for step in reversed(range(len(ctx.trail))):
            out, divisor = ctx.trail[step]
            g = (g - (g * out) @ ctx.spreaders[step % 2]) / divisor
        return torch.as_tensor(g, device=grad.device).view(grad.shape), None, None


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Alternately normalise the columns and rows of comb [..., n, n] (columns first), `iters`
    times each, so it approaches a doubly-stochastic matrix.

    The matrices are tiny (4 x 4 per token) and the 2 * iters normalisations are sequential, so
    the cost is dispatch, not arithmetic: this loop was a third of the torch ops of a decode
    step. On a CPU (up to `NUMPY_MAX_MATRICES`) it runs in numpy, whose calls cost less than
    torch's; the sums are matmuls (`_spreaders`). Training differentiates through it with the
    closed-form backward of `_Sinkhorn`, not with autograd's record of the loop
    (tests/test_model_hyper.py checks both against the plain loop). In a graph being compiled
    the sums are plain sums over an axis, which inductor fuses with the divisions into one
    loop (a matmul would stay a library call per division).
    """
    if torch.compiler.is_compiling():
        c = comb.float()
        for step in range(2 * iters - 1):  # columns (sum over rows), then rows
            c = c / (c.sum(dim=-2 if step % 2 == 0 else -1, keepdim=True) + eps)
        return c
    if torch.is_grad_enabled() and comb.requires_grad:
        return _Sinkhorn.apply(comb, iters, eps)
    c, spreaders = _as_arrays(comb.float())
    return torch.as_tensor(_normalise(c, spreaders, iters, eps), device=comb.device).view(
        comb.shape
    )


@functools.cache
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
