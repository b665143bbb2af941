"""The DeepSeek-V4 network. Module and parameter names are the released tensor names
(`layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`, `mtp.0.e_proj.weight`),
so a checkpoint loads with no renaming table."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model.attention import Attention
from dsv4.model.cache import ModelCache
from dsv4.model.config import ModelArgs
from dsv4.model.fusion import linear, packed_for_kernels
from dsv4.model.hyper import hc_head, hc_post, hc_pre
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import rope_inv_freq

KV_CACHE_DTYPES = ("auto", "fp8")
# Long prompts run in chunks through the cache: the working set of a step stays bounded
# (so cost stays linear where the math is), and chunked == full forward is tested.
PREFILL_CHUNK = 1024
INDEXER_CACHE_DTYPES = ("auto", "fp4")


def _hc_params(module: nn.Module, prefix: str, args: ModelArgs, num_mixes: int) -> None:
    n = args.hc_mult
    module.register_parameter(
        f"{prefix}_fn",
        nn.Parameter(torch.zeros(num_mixes, n * args.hidden_size, dtype=torch.float32)),
    )
    module.register_parameter(
        f"{prefix}_base", nn.Parameter(torch.zeros(num_mixes, dtype=torch.float32))
    )
    module.register_parameter(
        f"{prefix}_scale", nn.Parameter(torch.ones(3 if num_mixes != n else 1, dtype=torch.float32))
    )


class Block(nn.Module):
    """Attention sub-block then MoE sub-block, each wrapped in hyper-connections."""

    def __init__(self, args: ModelArgs, layer_id: int, ratio: int, hashed: bool):
        super().__init__()
        self.args, self.layer_id, self.ratio = args, layer_id, ratio
        self.attn = Attention(args, ratio)
        self.ffn = MoE(args, hashed)
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        mixes = (2 + args.hc_mult) * args.hc_mult
        _hc_params(self, "hc_attn", args, mixes)
        _hc_params(self, "hc_ffn", args, mixes)

    def fuse_projections(self) -> None:
        """For inference: each group of products that read the same input as one product, the
        routed experts stacked (see the sub-blocks' `fuse_projections`)."""
        self.attn.fuse_projections()
        self.ffn.fuse_projections()

    def _pre(self, x, which):
        return hc_pre(x, *self.hc_args(which))

    def hc_args(self, which: str) -> tuple:
        """`hc_pre`'s arguments after the streams, for the "attn" or "ffn" sub-block."""
        a = self.args
        return (getattr(self, f"hc_{which}_fn"), getattr(self, f"hc_{which}_base"),
                getattr(self, f"hc_{which}_scale"), a.hc_sinkhorn_iters, a.hc_eps,
                a.rms_norm_eps)

    def forward(self, x, ids, positions, inv_freq, cache, kv_fp8, indexer_fp4):
        """x [B, S, n, D] streams -> streams."""
        h, post, comb = self._pre(x, "attn")
        out = self.attn(self.attn_norm(h), positions, inv_freq, cache, kv_fp8, indexer_fp4)
        x = hc_post(out, x, post, comb)
        h, post, comb = self._pre(x, "ffn")
        return hc_post(self.ffn(self.ffn_norm(h), ids), x, post, comb)


class MTPBlock(Block):
    """Multi-token prediction (`mtp.N`): from the main model's final streams at position t and
    the embedding of token t+1, predict token t+2 (a speculative-decoding draft)."""

    def __init__(self, args: ModelArgs, layer_id: int, ratio: int):
        super().__init__(args, layer_id, ratio, hashed=False)
        d = args.hidden_size
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, args.rms_norm_eps)
        self.hnorm = RMSNorm(d, args.rms_norm_eps)
        self.norm = RMSNorm(d, args.rms_norm_eps)
        _hc_params(self, "hc_head", args, args.hc_mult)


class Transformer(nn.Module):
    def __init__(
        self, args: ModelArgs, kv_cache_dtype: str = "auto", indexer_cache_dtype: str = "auto"
    ):
        super().__init__()
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}"
            )
        if indexer_cache_dtype not in INDEXER_CACHE_DTYPES:
            raise ValueError(
                f"indexer_cache_dtype must be one of {INDEXER_CACHE_DTYPES}, "
                f"got {indexer_cache_dtype!r}"
            )
        nope_dim = args.head_dim - args.qk_rope_head_dim
        if kv_cache_dtype == "fp8" and nope_dim % 64:
            raise ValueError(
                f"kv_cache_dtype='fp8' needs head_dim - qk_rope_head_dim ({nope_dim}) "
                "to be a multiple of 64 (the FP8 block); use kv_cache_dtype='auto'"
            )
        self.args = args
        self.kv_fp8, self.indexer_fp4 = kv_cache_dtype == "fp8", indexer_cache_dtype == "fp4"
        d = args.hidden_size
        self.embed = nn.Embedding(args.vocab_size, d)
        self.layers = nn.ModuleList(
            Block(args, i, r, hashed=i < args.num_hash_layers)
            for i, r in enumerate(args.layer_ratios)
        )
        self.mtp = nn.ModuleList(
            MTPBlock(args, args.num_hidden_layers + i, r) for i, r in enumerate(args.mtp_ratios)
        )
        self.norm = RMSNorm(d, args.rms_norm_eps)
        self.head = nn.Linear(d, args.vocab_size, bias=False)
        self.register_buffer("_head_packed", None, persistent=False)  # see fuse_projections
        _hc_params(self, "hc_head", args, args.hc_mult)
        rd = args.qk_rope_head_dim
        self.register_buffer(
            "inv_freq_window",
            rope_inv_freq(rd, args.rope_theta, None, args.max_position_embeddings),
            persistent=False,
        )
        self.register_buffer(
            "inv_freq_compress",
            rope_inv_freq(
                rd, args.compress_rope_theta, args.rope_scaling, args.max_position_embeddings
            ),
            persistent=False,
        )

    # ------------------------------------------------------------------ forward

    def _inv_freq(self, ratio: int) -> torch.Tensor:
        return self.inv_freq_compress if ratio else self.inv_freq_window

    def fuse_projections(self) -> None:
        """For inference (the engine): every block's products that read one input as one
        product, the routed experts stacked, and the bf16 products through the CPU kernels
        where they run (`Block.fuse_projections`, `fusion.linear`)."""
        for layer in [*self.layers, *self.mtp]:
            layer.fuse_projections()
        self._head_packed = packed_for_kernels(self.head.weight)

    def _head(self, x: torch.Tensor, owner: nn.Module, norm: RMSNorm) -> torch.Tensor:
        a = self.args
        h = hc_head(
            x, owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale, a.hc_eps, a.rms_norm_eps
        )
        return linear(norm(h), self.head.weight, self._head_packed).float()

    def forward_streams(self, ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """ids [B, T] (at positions cache.num_tokens..) -> final streams [B, T, n, D]."""
        start = cache.num_tokens if cache is not None else 0
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.embed(ids)[:, :, None, :].expand(-1, -1, self.args.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                ids,
                positions,
                self._inv_freq(layer.ratio),
                cache.layers[i] if cache is not None else None,
                self.kv_fp8,
                self.indexer_fp4,
            )
        if cache is not None:
            cache.num_tokens += ids.shape[1]
        return x

    def forward(self, ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, vocab] float32."""
        return self._head(self.forward_streams(ids, cache), self, self.norm)

    def mtp_forward(
        self,
        streams: torch.Tensor,
        next_ids: torch.Tensor,
        depth: int = 0,
        cache: ModelCache | None = None,
    ) -> torch.Tensor:
        """Draft logits for token t+2 from the main streams at t [B, T, n, D] and the ids of
        token t+1 [B, T]. -> [B, T, vocab] float32."""
        block = self.mtp[depth]
        start = cache.num_tokens if cache is not None else 0
        positions = torch.arange(start, start + next_ids.shape[1], device=next_ids.device)
        e = block.e_proj(block.enorm(self.embed(next_ids)))[:, :, None, :]
        x = e + block.h_proj(block.hnorm(streams))
        x = block(
            x,
            next_ids,
            positions,
            self._inv_freq(block.ratio),
            cache.layers[0] if cache is not None else None,
            self.kv_fp8,
            self.indexer_fp4,
        )
        if cache is not None:
            cache.num_tokens += next_ids.shape[1]
        return self._head(x, block, block.norm)

    # ------------------------------------------------------------------ public API

    def new_cache(self) -> ModelCache:
        return ModelCache.empty(len(self.layers))

    def prefill(self, ids: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """Run ids [B, S] into `cache` in chunks of PREFILL_CHUNK -> logits [B, S, vocab]."""
        return torch.cat(
            [
                self(ids[:, i : i + PREFILL_CHUNK], cache)
                for i in range(0, ids.shape[1], PREFILL_CHUNK)
            ],
            dim=1,
        )

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, S, vocab] float32 logits of every position (the cache it fills on the
        way is thrown away)."""
        ids = input_ids.to(self.embed.weight.device)
        if ids.shape[1] <= PREFILL_CHUNK:
            return self(ids)
        return self.prefill(ids, self.new_cache())

    @torch.inference_mode()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
    ) -> torch.Tensor:
        """Greedy decoding with the cache: [1, S] -> [1, S + N] (stops early at EOS if given)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = input_ids.to(self.embed.weight.device)
        cache = self.new_cache()
        logits = self.prefill(ids, cache)
        out = [ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            logits = self(nxt, cache)
        return torch.cat(out, dim=1)
