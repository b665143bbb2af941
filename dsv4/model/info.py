"""`dsv4 info`: parameters, storage formats and memory of a V4 model or preset.

The network is built on the meta device, so even V4-Pro is described without memory.
Activated parameters follow DeepSeek's convention: the main model's parameters that touch a
token (routed experts counted k of E, the input embedding lookup and the MTP layer excluded),
which reproduces the published 13B (Flash) and 49B (Pro).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from dsv4.checkpoint.layout import weight_format
from dsv4.model.config import ModelArgs
from dsv4.plan.kv import kv_bytes_per_token_by_layer, kv_entry_bytes, kv_window_bytes

COMPONENTS = (
    ("mtp", lambda n: n.startswith("mtp.")),
    ("embed", lambda n: n.startswith("embed.")),
    ("head", lambda n: n.startswith("head.")),
    ("routed_experts", lambda n: ".ffn.experts." in n),
    ("shared_experts", lambda n: ".ffn.shared_experts." in n),
    ("router", lambda n: ".ffn.gate." in n),
    ("indexer", lambda n: ".attn.indexer." in n),
    ("compressor", lambda n: ".attn.compressor." in n),
    ("attention", lambda n: ".attn." in n),
    ("norms_and_hyper_connections", lambda n: True),
)


def component_of(name: str) -> str:
    return next(c for c, match in COMPONENTS if match(name))


def stored_bytes(
    name: str, numel: int, shape: tuple[int, ...], quantized: bool
) -> tuple[str, float]:
    """(format, bytes) of one tensor as the release stores it."""
    fmt = weight_format(name) if quantized else "as_is"
    if fmt == "fp8":  # e4m3 + one e8m0 scale per 128x128 block
        blocks = -(-shape[0] // 128) * -(-shape[1] // 128)
        return "fp8", numel + blocks
    if fmt == "fp4":  # two values per byte + one e8m0 scale per 32 inputs
        return "fp4", numel / 2 + numel / 32
    fp32 = name.endswith(("norm.weight", "attn_sink", ".ape", "gate.bias")) or "hc_" in name
    return ("fp32", 4 * numel) if fp32 else ("bf16", 2 * numel)


def _meta_tensors(args: ModelArgs):
    """(name, meta tensor, multiplicity) of the whole model, built on the meta device. Main
    layers of the same kind (ratio, hash routing) have identical shapes, so one of each is
    built and counted as many times as it occurs: V4-Pro is described in a second."""
    import dataclasses
    from collections import Counter

    import torch

    from dsv4.model.loader import build_model
    from dsv4.model.transformer import Block

    shell = dataclasses.replace(
        args, num_hidden_layers=0, num_hash_layers=0, compress_ratios=args.mtp_ratios
    )
    for name, t in build_model(shell, "meta").state_dict().items():
        yield name, t, 1
    kinds = Counter((r, i < args.num_hash_layers) for i, r in enumerate(args.layer_ratios))
    for (ratio, hashed), count in kinds.items():
        with torch.device("meta"):
            block = Block(args, 0, ratio, hashed)
        for name, t in block.state_dict().items():
            yield f"layers.0.{name}", t, count


def describe(args: ModelArgs) -> dict:
    by_component: dict[str, int] = defaultdict(int)
    bytes_by_format: dict[str, float] = defaultdict(float)
    active = 0.0
    k, E = args.num_experts_per_tok, args.n_routed_experts
    for name, t, count in _meta_tensors(args):
        n = t.numel() * count
        component = component_of(name)
        by_component[component] += n
        if t.is_floating_point():
            fmt, nbytes = stored_bytes(name, t.numel(), tuple(t.shape), args.is_quantized)
        else:
            fmt, nbytes = "int", t.numel() * t.element_size()
        bytes_by_format[fmt] += nbytes * count
        if component in ("mtp", "embed") or not t.is_floating_point():
            continue
        active += n * k / E if component == "routed_experts" else n
    total = sum(v for c, v in by_component.items() if c != "mtp")
    hd, rd = args.head_dim, args.qk_rope_head_dim
    kv = {}
    for kv_dtype, idx_dtype in (("bf16", "bf16"), ("fp8", "fp4")):
        per_layer = kv_bytes_per_token_by_layer(
            args.layer_ratios, hd, rd, args.index_head_dim, kv_dtype, idx_dtype
        )
        kv[f"{kv_dtype}_kv_{idx_dtype}_indexer"] = {
            "bytes_per_token": sum(per_layer),
            "window_bytes_per_sequence": kv_window_bytes(
                args.num_hidden_layers, args.sliding_window, hd, rd, kv_dtype
            ),
            "entry_bytes": kv_entry_bytes(hd, rd, kv_dtype),
        }
    ratios = args.layer_ratios
    return {
        "total_params": total,
        "active_params": int(active),
        "mtp_params": by_component["mtp"],
        "params_by_component": dict(by_component),
        "weight_bytes_by_format": {f: int(b) for f, b in bytes_by_format.items()},
        "weight_bytes": int(sum(bytes_by_format.values())),
        "layers": {
            "window_only": ratios.count(0),
            "csa": ratios.count(4),
            "hca": ratios.count(128),
            "hash_moe": args.num_hash_layers,
            "mtp": args.num_nextn_predict_layers,
        },
        "kv_cache": kv,
        "max_position_embeddings": args.max_position_embeddings,
    }


def _human(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="v4-flash", help="preset (v4-flash, v4-pro), model folder or config.json"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    info = describe(ModelArgs.resolve(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {args.model}")
    print(
        f"  parameters: {_human(info['total_params'])} total, "
        f"{_human(info['active_params'])} activated per token "
        f"(+{_human(info['mtp_params'])} in the MTP layer)"
    )
    for component, n in sorted(info["params_by_component"].items(), key=lambda kv: -kv[1]):
        print(f"    {component:<28} {_human(n):>10}")
    print(f"  weights as stored: {_gib(info['weight_bytes'])}")
    for fmt, b in sorted(info["weight_bytes_by_format"].items(), key=lambda kv: -kv[1]):
        print(f"    {fmt:<28} {_gib(b):>12}")
    layers = info["layers"]
    print(
        f"  layers: {layers['csa']} CSA, {layers['hca']} HCA, {layers['window_only']} "
        f"window-only, {layers['hash_moe']} hash-routed, {layers['mtp']} MTP"
    )
    for name, kv in info["kv_cache"].items():
        per_m = kv["bytes_per_token"] * 2**20 / 2**30
        print(
            f"  KV cache ({name.replace('_', ' ')}): {kv['bytes_per_token']:.0f} B/token, "
            f"{per_m:.2f} GiB per 1M-token sequence + "
            f"{_gib(kv['window_bytes_per_sequence'])} window"
        )
    return 0
