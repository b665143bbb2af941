"""Linears that read the same input, fused for inference into one product."""

from __future__ import annotations

import torch
from torch import nn


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """Put the weights of `linears` (no biases) in one [sum of outs, in] tensor, in the order
    given, and make each Linear's weight a view of its rows: no extra memory, and one product
    with the result computes all of them (a batched decode step then makes one BLAS call
    where it made several). The parameters share storage afterwards, which safetensors
    refuses to save: the engine fuses, checkpoint and training code do not."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    return fused
