"""Analytic cost model of DeepSeek V3 / V3.2 / V4 from their config.json: parameters by
component, weight bytes per storage plan, KV bytes per token, FLOPs per token at a context
length, and bytes moved per decode step. Pure Python (no torch), so it describes any size.

Conventions (stated once, used everywhere):
- FLOPs count a multiply-add as 2. Per-token FLOPs = 2 x activated parameters (the matmuls)
  + attention over the keys the token actually reads at that context length.
- Activated parameters follow DeepSeek's published convention: the main model (MTP layer
  excluded), routed experts counted k of E, the input embedding (a lookup) excluded.
- V3-family attention is MLA in its absorbed form (what serving engines run in decode):
  scores over kv_lora_rank + rope dims, values over kv_lora_rank dims, per head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dsv4.plan.kv import index_key_bytes, kv_bytes_per_token_by_layer, kv_entry_bytes

PRESETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "configs"
PRESETS = {"v4-flash": "v4-flash.json", "v4-pro": "v4-pro.json", "v3.2": "v3.2.json",
           "v3": "v3.json"}
STORAGE_PLANS = ("fp4-fp8", "fp8", "int8", "bf16")
# bytes per parameter of each kind under each plan (block scales included)
BYTES_PER_PARAM = {
    "fp4-fp8": {"expert": 0.5 + 1 / 32, "linear": 1 + 1 / 128**2, "other": 2},
    "fp8": {"expert": 1 + 1 / 128**2, "linear": 1 + 1 / 128**2, "other": 2},
    "int8": {"expert": 1 + 4 / 2048, "linear": 1 + 4 / 2048, "other": 2},  # per-channel fp32
    "bf16": {"expert": 2, "linear": 2, "other": 2},
}


def load_config(model: str) -> tuple[str, dict]:
    """(name, config dict) of a preset or a config.json path / model folder."""
    if model in PRESETS:
        return model, json.loads((PRESETS_DIR / PRESETS[model]).read_text())
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}) or a "
                         "path to a config.json")
    return path.parent.name or str(path), json.loads(path.read_text())


@dataclass
class ModelSpec:
    name: str
    config: dict

    @classmethod
    def from_name(cls, model: str) -> ModelSpec:
        name, config = load_config(model)
        return cls(name, config)

    @property
    def family(self) -> str:
        c = self.config
        if "compress_ratios" in c:
            return "v4"
        return "v3.2" if "index_topk" in c else "v3"

    def __getattr__(self, key: str):
        try:
            return self.__dict__["config"][key]
        except KeyError:
            raise AttributeError(key) from None

    # ------------------------------------------------------------------ parameters

    def _v4_layer(self, ratio: int, hashed: bool) -> dict[str, float]:
        D, H, hd, qr = self.hidden_size, self.num_attention_heads, self.head_dim, self.q_lora_rank
        g, olr, E, inter = self.o_groups, self.o_lora_rank, self.n_routed_experts, \
            self.moe_intermediate_size
        n = self.config.get("hc_mult", 4)
        mixes = (2 + n) * n
        attn = D * qr + qr + qr * H * hd + D * hd + hd + H * hd * olr + g * olr * D + H
        if ratio:
            width = (2 if ratio == 4 else 1) * hd
            attn += 2 * D * width + ratio * width + hd
        linear_attn = D * qr + qr * H * hd + D * hd + H * hd * olr + g * olr * D
        if ratio == 4:
            nI, dI = self.index_n_heads, self.index_head_dim
            attn += qr * nI * dI + D * nI + 2 * D * 2 * dI + 4 * 2 * dI + dI
            linear_attn += qr * nI * dI
        return {
            "attention": attn,
            "routed_experts": E * 3 * D * inter,
            "shared_experts": self.n_shared_experts * 3 * D * inter,
            "router": E * D + (0 if hashed else E),
            "norms_and_hyper_connections": 2 * D + 2 * (mixes * n * D + mixes + 3),
            "_linear": linear_attn + self.n_shared_experts * 3 * D * inter,
        }

    def _v3_layer(self, dense: bool) -> dict[str, float]:
        D, H, qr, kvr = self.hidden_size, self.num_attention_heads, self.q_lora_rank, \
            self.kv_lora_rank
        nope, rope, v = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        linear_attn = D * qr + qr * H * (nope + rope) + D * (kvr + rope) + kvr * H * (nope + v) \
            + H * v * D
        attn = linear_attn + qr + kvr
        if self.family == "v3.2":
            nI, dI = self.index_n_heads, self.index_head_dim
            attn += qr * nI * dI + D * dI + 2 * dI + D * nI
            linear_attn += qr * nI * dI + D * dI
        layer = {"attention": attn, "norms_and_hyper_connections": 2 * D}
        if dense:
            layer.update(dense_mlp=3 * D * self.intermediate_size,
                         _linear=linear_attn + 3 * D * self.intermediate_size)
        else:
            E, inter = self.n_routed_experts, self.moe_intermediate_size
            layer.update(routed_experts=E * 3 * D * inter,
                         shared_experts=self.n_shared_experts * 3 * D * inter,
                         router=E * D + E,
                         _linear=linear_attn + self.n_shared_experts * 3 * D * inter)
        return layer

    def _layers(self) -> list[dict[str, float]]:
        n = self.num_hidden_layers
        if self.family == "v4":
            ratios = self.compress_ratios[:n]
            return [self._v4_layer(r, i < self.num_hash_layers) for i, r in enumerate(ratios)]
        return [self._v3_layer(i < self.first_k_dense_replace) for i in range(n)]

    def _mtp_layers(self) -> list[dict[str, float]]:
        """Each MTP layer: a full block plus its input projections, norms and head mixer."""
        D = self.hidden_size
        if self.family == "v4":
            n = self.config.get("hc_mult", 4)
            ratios = self.compress_ratios[self.num_hidden_layers:]
            layers = [self._v4_layer(r, False) for r in ratios]
            extra = n * n * D + n + 1
        else:
            layers = [self._v3_layer(False)
                      for _ in range(self.config.get("num_nextn_predict_layers", 0))]
            extra = 0
        for layer in layers:
            layer["mtp_projections"] = 2 * D * D + 3 * D + extra
            layer["_linear"] += 2 * D * D
        return layers

    def _mtp_params(self) -> float:
        return sum(v for layer in self._mtp_layers() for k, v in layer.items() if k[0] != "_")

    def params_by_component(self) -> dict[str, float]:
        D, V = self.hidden_size, self.vocab_size
        out: dict[str, float] = {"embed": V * D, "head": V * D}
        for layer in self._layers():
            for k, v in layer.items():
                if k[0] != "_":
                    out[k] = out.get(k, 0) + v
        out["norms_and_hyper_connections"] = out.get("norms_and_hyper_connections", 0) + D
        if self.family == "v4":
            n = self.config.get("hc_mult", 4)
            out["norms_and_hyper_connections"] += n * n * D + n + 1
        return out

    @property
    def total_params(self) -> float:
        return sum(self.params_by_component().values())

    @property
    def mtp_params(self) -> float:
        return self._mtp_params()

    @property
    def active_params(self) -> float:
        p = self.params_by_component()
        k, E = self.num_experts_per_tok, self.n_routed_experts
        return self.total_params - p["embed"] - p.get("routed_experts", 0) * (1 - k / E)

    # ------------------------------------------------------------------ weights

    def _param_kinds(self) -> dict[str, float]:
        layers = self._layers() + self._mtp_layers()
        linear = sum(layer["_linear"] for layer in layers)
        expert = sum(layer.get("routed_experts", 0) for layer in layers)
        return {"expert": expert, "linear": linear,
                "other": self.total_params + self.mtp_params - expert - linear}

    def weight_bytes(self, plan: str) -> float:
        """Bytes of all weights (MTP layer included, as shipped) under a storage plan."""
        if plan not in STORAGE_PLANS:
            raise ValueError(f"unknown storage plan {plan!r}; plans: {', '.join(STORAGE_PLANS)}")
        per = BYTES_PER_PARAM[plan]
        return sum(n * per[kind] for kind, n in self._param_kinds().items())

    def expert_bytes(self, plan: str) -> float:
        """Bytes of one routed expert under a plan."""
        return 3 * self.hidden_size * self.moe_intermediate_size * BYTES_PER_PARAM[plan]["expert"]

    # ------------------------------------------------------------------ KV cache

    def kv_bytes_per_token_by_layer_type(self, kv_dtype: str = "bf16",
                                         indexer_dtype: str = "bf16") -> dict[str, float]:
        n = self.num_hidden_layers
        if self.family == "v4":
            ratios = self.compress_ratios[:n]
            per = kv_bytes_per_token_by_layer(ratios, self.head_dim, self.qk_rope_head_dim,
                                              self.index_head_dim, kv_dtype, indexer_dtype)
            out: dict[str, float] = {}
            for r, b in zip(ratios, per):
                kind = {0: "window_only", 4: "csa", 128: "hca"}[r]
                out[kind] = out.get(kind, 0) + b
            return out
        entry = self._mla_entry_bytes(kv_dtype)
        if self.family == "v3.2":
            key = self.index_head_dim + 4 if indexer_dtype in ("fp8", "fp4") else \
                index_key_bytes(self.index_head_dim, "bf16")
            return {"mla": n * entry, "indexer": n * key}
        return {"mla": n * entry}

    def _mla_entry_bytes(self, kv_dtype: str) -> float:
        kvr, rope = self.kv_lora_rank, self.qk_rope_head_dim
        if kv_dtype == "fp8":  # FlashMLA's FP8 entry: e4m3 latent + 4 fp32 scales + bf16 RoPE
            return kvr + 16 + 2 * rope
        return (kvr + rope) * 2

    def kv_bytes_per_token(self, kv_dtype: str = "bf16", indexer_dtype: str = "bf16") -> float:
        return sum(self.kv_bytes_per_token_by_layer_type(kv_dtype, indexer_dtype).values())

    def kv_bytes_per_sequence(self, context: int, kv_dtype: str = "bf16",
                              indexer_dtype: str = "bf16") -> float:
        """Whole-sequence KV bytes: per-token part, plus V4's fixed windows and compressor
        state (one open window of raw rows per compressor, float32)."""
        total = self.kv_bytes_per_token(kv_dtype, indexer_dtype) * context
        if self.family == "v4":
            n = self.num_hidden_layers
            window = min(self.sliding_window, context)
            entry = kv_entry_bytes(self.head_dim, self.qk_rope_head_dim, kv_dtype)
            total += n * window * entry
            for r in self.compress_ratios[:n]:
                if r:  # kv and score rows of the open (and, for ratio 4, previous) window
                    width = (2 if r == 4 else 1) * self.head_dim
                    total += 2 * r * width * 4 * (2 if r == 4 else 1)
                if r == 4:
                    total += 2 * 4 * 2 * self.index_head_dim * 4 * 2
        return total

    # ------------------------------------------------------------------ FLOPs and bytes

    def attention_flops_per_token(self, context: int) -> float:
        """Attention work of one token at position `context` (scores + weighted values)."""
        L = max(context, 1)
        H = self.num_attention_heads
        if self.family == "v4":
            W, hd = self.sliding_window, self.head_dim
            total = 0.0
            for r in self.compress_ratios[: self.num_hidden_layers]:
                keys = min(W, L)
                if r == 4:
                    keys += min(self.index_topk, L // 4)
                    total += 2 * self.index_n_heads * self.index_head_dim * (L / 4)
                elif r == 128:
                    keys += L // 128
                total += 2 * 2 * H * hd * keys
            return total
        kvr, rope = self.kv_lora_rank, self.qk_rope_head_dim
        keys = min(self.index_topk, L) if self.family == "v3.2" else L
        per_layer = 2 * H * (kvr + rope) * keys + 2 * H * kvr * keys
        if self.family == "v3.2":
            per_layer += 2 * self.index_n_heads * self.index_head_dim * L
        return self.num_hidden_layers * per_layer

    def flops_per_token(self, context: int) -> float:
        return 2 * self.active_params + self.attention_flops_per_token(context)

    def prefill_flops(self, num_tokens: int, steps: int = 64) -> float:
        """FLOPs of a prefill of `num_tokens` (each token attends to its own prefix)."""
        grid = [max(1, round(num_tokens * (i + 0.5) / steps)) for i in range(steps)]
        attention = sum(self.attention_flops_per_token(p) for p in grid) / steps * num_tokens
        return 2 * self.active_params * num_tokens + attention

    def kv_read_bytes_per_token(self, context: int, kv_dtype: str = "bf16",
                                indexer_dtype: str = "bf16") -> float:
        """Cache bytes one decode step reads for one sequence."""
        L = max(context, 1)
        if self.family == "v4":
            entry = kv_entry_bytes(self.head_dim, self.qk_rope_head_dim, kv_dtype)
            key = index_key_bytes(self.index_head_dim, indexer_dtype)
            total = 0.0
            for r in self.compress_ratios[: self.num_hidden_layers]:
                total += min(self.sliding_window, L) * entry
                if r == 4:
                    total += min(self.index_topk, L // 4) * entry + (L / 4) * key
                elif r == 128:
                    total += (L / 128) * entry
            return total
        entry = self._mla_entry_bytes(kv_dtype)
        if self.family == "v3.2":
            key = self.kv_bytes_per_token_by_layer_type(kv_dtype, indexer_dtype)["indexer"]
            return self.num_hidden_layers * min(self.index_topk, L) * entry + L * key
        return self.num_hidden_layers * L * entry

    def decode_weight_bytes(self, batch: int, plan: str) -> float:
        """Weight bytes one decode step of `batch` tokens reads: everything but the routed
        experts, plus the experts the batch touches (expected count, uniform routing)."""
        k, E = self.num_experts_per_tok, self.n_routed_experts
        moe_layers = sum(1 for layer in self._layers() if "routed_experts" in layer)
        touched = E * (1 - (1 - k / E) ** max(batch, 1))
        per = BYTES_PER_PARAM[plan]
        main = self._layers()
        expert = sum(layer.get("routed_experts", 0) for layer in main)
        linear = sum(layer["_linear"] for layer in main)
        other = self.total_params - self.params_by_component()["embed"] - expert - linear
        return linear * per["linear"] + other * per["other"] + \
            moe_layers * touched * self.expert_bytes(plan)
