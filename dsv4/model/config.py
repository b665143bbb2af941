"""`ModelArgs`: a DeepSeek-V4 `config.json`, field for field, validated.

No torch import here, so the CLI and the planner can read configs cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "configs"
PRESETS = {"v4-flash": "v4-flash.json", "v4-pro": "v4-pro.json"}
ATTENTION_RATIOS = (0, 4, 128)  # sliding window only, CSA, HCA
MAY_BE_ZERO = frozenset({"num_hidden_layers", "n_shared_experts", "num_hash_layers",
                         "num_nextn_predict_layers",
                         "bos_token_id", "eos_token_id"})

# Keys of released configs that describe the Hugging Face wrapper, not the network.
IGNORED_KEYS = frozenset(
    {
        "architectures",
        "attention_bias",
        "attention_dropout",
        "hidden_act",
        "initializer_range",
        "model_type",
        "topk_method",
        "transformers_version",
        "use_cache",
        "torch_dtype",
        "dtype",
        "tie_word_embeddings",
        "auto_map",
        "pad_token_id",
    }
)


@dataclass
class ModelArgs:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    num_hash_layers: int = 3
    num_nextn_predict_layers: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    sliding_window: int = 128
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = None
    compress_ratios: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantization_config: dict | None = None
    expert_dtype: str | None = None

    def __post_init__(self) -> None:
        self._check_types()
        n = self.num_hidden_layers
        self.compress_ratios = list(self.compress_ratios) or \
            [0] * (n + self.num_nextn_predict_layers)
        expected = n + self.num_nextn_predict_layers
        if len(self.compress_ratios) != expected:
            raise ValueError(
                f"compress_ratios has {len(self.compress_ratios)} entries; it needs one per layer "
                f"plus one per MTP layer: num_hidden_layers + num_nextn_predict_layers = {expected}"
            )
        bad = sorted({r for r in self.compress_ratios if r not in ATTENTION_RATIOS})
        if bad:
            raise ValueError(
                f"compress_ratios has unsupported values {bad}; V4 uses "
                f"{ATTENTION_RATIOS} (window only, CSA, HCA)"
            )
        checks = [
            (
                "num_key_value_heads",
                self.num_key_value_heads == 1,
                "V4 shares one KV head across all query heads; set it to 1",
            ),
            (
                "o_groups",
                self.num_attention_heads % self.o_groups == 0,
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by o_groups",
            ),
            (
                "qk_rope_head_dim",
                0 < self.qk_rope_head_dim <= min(self.head_dim, self.index_head_dim)
                and self.qk_rope_head_dim % 2 == 0,
                "must be even and at most head_dim and index_head_dim",
            ),
            (
                "num_experts_per_tok",
                0 < self.num_experts_per_tok <= self.n_routed_experts,
                f"must be between 1 and n_routed_experts ({self.n_routed_experts})",
            ),
            ("num_hash_layers", 0 <= self.num_hash_layers <= n, "must be between 0 and the layers"),
            ("scoring_func", self.scoring_func == "sqrtsoftplus", "V4 routes with 'sqrtsoftplus'"),
            ("sliding_window", self.sliding_window > 0, "must be positive"),
            ("hc_mult", self.hc_mult > 0, "must be positive"),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters >= 1, "must be at least 1"),
            ("index_topk", self.index_topk > 0, "must be positive"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"config field {name}={getattr(self, name)!r} is invalid: {why}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ValueError(f"rope_scaling type {kind!r} is not supported; V4 uses 'yarn'")
            for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                if key not in self.rope_scaling:
                    raise ValueError(f"rope_scaling is missing {key!r}")

    def _check_types(self) -> None:
        """Each field has its type and a sensible sign, before the checks that combine them."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                low = 0 if f.name in MAY_BE_ZERO else 1
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
                rule = f"an integer >= {low}"
            elif f.type == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    0 < value < math.inf
                rule = "a positive number"
            elif f.type == "list[int]":
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value)
                rule = "a list of integers"
            elif f.type == "dict | None":
                ok, rule = value is None or isinstance(value, dict), "an object or null"
            else:
                continue
            if not ok:
                raise ValueError(f"config field {f.name}={value!r} is invalid: it must be {rule}")

    # ------------------------------------------------------------------ derived

    @property
    def layer_ratios(self) -> list[int]:
        """Compression ratio of each main layer (the MTP entries excluded)."""
        return self.compress_ratios[: self.num_hidden_layers]

    @property
    def mtp_ratios(self) -> list[int]:
        return self.compress_ratios[self.num_hidden_layers :]

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantization_config)

    # ------------------------------------------------------------------ I/O

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        if not isinstance(config, dict):
            raise ValueError(f"a config must be a JSON object of fields, got "
                             f"{type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known - IGNORED_KEYS)
        if unknown:
            raise ValueError(
                f"unknown config fields {unknown}: not part of a DeepSeek-V4 "
                "config.json (check the spelling, or remove them)"
            )
        kwargs = {k: v for k, v in config.items() if k in known}
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(config)

    @classmethod
    def from_preset(cls, name: str) -> ModelArgs:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_json(PRESETS_DIR / PRESETS[name])

    @classmethod
    def resolve(cls, model: str | Path) -> ModelArgs:
        """A preset name, a model folder, or a config.json path."""
        if str(model) in PRESETS:
            return cls.from_preset(str(model))
        if not Path(model).exists():
            raise ValueError(
                f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                "existing model folder or config.json"
            )
        return cls.from_json(model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
