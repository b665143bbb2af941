"""Test helper: tiny random DeepSeek-V4 models from `transformers` (the numerical oracle),
converted to the released checkpoint layout with V4_SPEC section 3's name mapping."""

from __future__ import annotations

import re

import torch
import transformers

from dsv4.model.config import ModelArgs
from dsv4.model.loader import build_model
from dsv4.model.transformer import Transformer

# transformers name (after `model.` is stripped) -> released name, applied in order
_RENAMES = [
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_", "hc_head_"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.shared_experts\.gate_proj\.", ".ffn.shared_experts.w1."),
    (r"\.mlp\.shared_experts\.up_proj\.", ".ffn.shared_experts.w3."),
    (r"\.mlp\.shared_experts\.down_proj\.", ".ffn.shared_experts.w2."),
    (r"\.mlp\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
    (r"\.mlp\.", ".ffn."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.sinks$", ".attn_sink"),
    (r"compressor\.kv_proj\.", "compressor.wkv."),
    (r"compressor\.gate_proj\.", "compressor.wgate."),
    (r"compressor\.position_bias$", "compressor.ape"),
    (r"compressor\.kv_norm\.", "compressor.norm."),
    (r"attn\.kv_proj\.", "attn.wkv."),
]


def tiny_args(**overrides) -> ModelArgs:
    base = dict(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=32,
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=6,
        sliding_window=16,
        compress_ratios=[0, 4, 128, 4, 0],
        num_hash_layers=1,
        max_position_embeddings=4096,
        rope_scaling={
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )
    base.update(overrides)
    return ModelArgs(**base)


def _hf_untrained(args: ModelArgs) -> transformers.DeepseekV4ForCausalLM:
    keys = (
        "vocab_size hidden_size num_hidden_layers num_attention_heads head_dim "
        "qk_rope_head_dim q_lora_rank o_groups o_lora_rank n_routed_experts "
        "num_experts_per_tok moe_intermediate_size index_n_heads index_head_dim index_topk "
        "sliding_window compress_ratios num_hash_layers max_position_embeddings rope_scaling "
        "hc_mult hc_sinkhorn_iters routed_scaling_factor rope_theta compress_rope_theta "
        "swiglu_limit"
    ).split()
    cfg = transformers.DeepseekV4Config(**{k: getattr(args, k) for k in keys},
                                        bos_token_id=args.bos_token_id,
                                        eos_token_id=args.eos_token_id)
    return transformers.DeepseekV4ForCausalLM(cfg).float().eval()


def _break_ties_like_dsv4(model: transformers.DeepseekV4ForCausalLM) -> None:
    # ReLU scores tie exactly (at 0) in tiny models, and torch.topk breaks ties differently for
    # different tensor widths. dsv4 defines the rule (lower entry index wins); give the oracle
    # the same rule by nudging exact zeros only (1e-30 vanishes against any nonzero score).
    for module in model.modules():
        if type(module).__name__ == "DeepseekV4IndexerScorer":
            module.register_forward_hook(
                lambda mod, inp, out: out - 1e-30 * torch.arange(out.shape[-1], device=out.device))


def hf_model(args: ModelArgs, seed: int = 0) -> transformers.DeepseekV4ForCausalLM:
    """A random transformers V4 with weights scaled so every branch matters."""
    torch.manual_seed(seed)
    model = _hf_untrained(args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "sinks", ".base", "hc_base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("scale", "hc_scale")):
                p.copy_(1 + torch.rand(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, args.n_routed_experts, b.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    _break_ties_like_dsv4(model)
    return model


def hf_model_from(model: Transformer) -> transformers.DeepseekV4ForCausalLM:
    """transformers' V4 holding the (fp32) weights of a dsv4 model, e.g. the bundled
    dsv4-tiny; transformers has no MTP layer, so that one is left out."""
    args, ours = model.args, model.state_dict()
    hf = _hf_untrained(args)
    weights = {}
    for hf_name, t in hf.state_dict().items():
        name = _released_name(hf_name)
        prefix = name.rsplit(".", 1)[0] + "."
        if name.endswith("experts.gate_up_proj"):
            weights[hf_name] = torch.stack([
                torch.cat([ours[f"{prefix}{e}.w1.weight"], ours[f"{prefix}{e}.w3.weight"]])
                for e in range(t.shape[0])])
        elif name.endswith("experts.down_proj"):
            weights[hf_name] = torch.stack([ours[f"{prefix}{e}.w2.weight"]
                                            for e in range(t.shape[0])])
        elif name in ours:
            weights[hf_name] = ours[name].to(t.dtype)
        else:  # computed buffers (RoPE frequencies)
            weights[hf_name] = t
    hf.load_state_dict(weights)
    _break_ties_like_dsv4(hf)
    return hf


def _released_name(hf_name: str) -> str:
    name = re.sub(r"^model\.", "", hf_name)
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def released_state_dict(
    hf: transformers.DeepseekV4ForCausalLM, args: ModelArgs, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The oracle's weights under released names, plus random `mtp.0.*` (transformers has no
    MTP layer)."""
    out: dict[str, torch.Tensor] = {}
    inter = args.moe_intermediate_size
    for name, t in hf.state_dict().items():
        name = _released_name(name)
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.w3.weight"] = t[e, inter:].clone()
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = t[e].clone()
        elif "inv_freq" not in name:
            out[name] = t.clone()
    ours = build_model(args, "cpu").state_dict()
    g = torch.Generator().manual_seed(seed + 2)
    for name, t in ours.items():
        if name.startswith("mtp."):
            if t.is_floating_point():
                scale = t.shape[-1] ** -0.5 if t.ndim >= 2 else 0.1
                out[name] = (torch.randn(t.shape, generator=g) * scale + (t.ndim < 2)).to(t.dtype)
            else:
                out[name] = t
        elif name in out and name.endswith("tid2eid"):
            out[name] = out[name].to(torch.int32)
    return out
