"""Which tensors of the released layout are stored in which format (V4_SPEC section 3)."""

from __future__ import annotations

import re

# Linear layers the release stores as FP8 e4m3 with 128x128 ue8m0 block scales.
_FP8 = re.compile(
    r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]"
    r"|mtp\.\d+\.(e_proj|h_proj))\.weight$"
)
# Routed experts: FP4 e2m1 packed two per byte, ue8m0 scale per 32 inputs.
_FP4 = re.compile(r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$")


def weight_format(name: str) -> str:
    """"fp8", "fp4" or "as_is" for a tensor name of the released layout."""
    if _FP4.search(name):
        return "fp4"
    if _FP8.search(name):
        return "fp8"
    return "as_is"


def scale_name(weight_name: str) -> str:
    """The release names the scale of `X.weight` `X.scale`."""
    return weight_name[: -len(".weight")] + ".scale"
