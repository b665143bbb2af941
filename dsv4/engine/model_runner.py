"""The V4 model runner: dsv4.model's weights over a ragged batch and the paged hybrid cache.

Embeddings, hyper-connections, norms, MoE and the head are the model's own modules (they act
per token, so the flat ragged batch is just a [1, T] sequence to them). Attention is the
model's math (dsv4.model.attention) with keys read from the paged pools instead of a
contiguous cache: window rings, compressor rings, compressed-entry and indexer-key blocks.
With MTP drafting on, the MTP layer runs after each step over the positions whose next token
became known, with its own window ring, and proposes each decoding request's next token.
"""

from __future__ import annotations

import torch

from dsv4.engine.batch import RaggedBatch
from dsv4.engine.config import EngineConfig
from dsv4.engine.decode_graph import DecodeGraph, is_plain_decode
from dsv4.engine.kv_cache import CacheSpec, KVCacheLayout, plan_layout
from dsv4.engine.paged_ops import (
    QueryBlocks,
    compressed_visibility,
    gather_compressed,
    query_blocks,
    ring_context,
    window_band,
    write_compressed,
    write_ring,
)
from dsv4.engine.runner import ModelRunner
from dsv4.model.attention import (
    Attention,
    gather_rows,
    index_scores,
    quantize_indexer,
    quantize_kv_nope,
    sparse_attention,
    stable_topk,
)
from dsv4.model.compressor import Compressor
from dsv4.model.hyper import hc_post, hc_pre
from dsv4.model.rope import apply_rope, rope_cos_sin
from dsv4.model.transformer import Transformer
from dsv4.platforms import get_platform

# Requests with at least this many new tokens (prefill chunks) attend in blocks of BAND_BLOCK
# queries sharing one window band; the rest (decodes) attend token by token.
BAND_BLOCK = 64
BAND_MIN_TOKENS = 16
# CSA layers attend to all compressed entries under the indexer's top-k mask (one fused
# attention over keys shared by a block) until there are more than this many times top-k;
# then each query gathers its own top-k entries, so the work stops growing with the context.
GATHER_TOPK_FACTOR = 4
# the indexer's products of a chunk of query blocks (every head's q . key): kept cache-sized,
# a long context's [tokens, heads, entries] products at once left the caches
INDEX_CHUNK_BYTES = 8 << 20

TORCH_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}


class V4ModelRunner(ModelRunner):
    def __init__(self, model: Transformer, layout: KVCacheLayout, max_model_len: int,
                 compile: bool = False):
        self.model = model
        model.fuse_projections()  # products that share an input as one; experts stacked
        self.layout = layout
        self.num_speculative_tokens = layout.spec.num_mtp_layers  # one draft per MTP layer
        if self.num_speculative_tokens:
            _check_mtp(model, self.num_speculative_tokens)
        self._streams: torch.Tensor | None = None  # final streams of the last step, for drafts
        self.max_model_len = max_model_len
        self.vocab_size = model.args.vocab_size
        self.eos_token_id = model.args.eos_token_id
        self.fp8 = layout.spec.kv_cache_dtype == "fp8"
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.pools = {
            name: torch.zeros(shape, device=self.device,
                              dtype=dtype if dtype in (torch.uint8, torch.float32) else self.dtype)
            for name, (shape, dtype) in layout.pool_shapes().items()
        }
        self.decode_graph = None  # plain decode steps compiled (EngineConfig.compile)
        self.hc_pre, self.hc_post = hc_pre, hc_post  # the general path's hyper-connections
        if compile:
            options = _compile_options(str(self.device))
            self.decode_graph = DecodeGraph(model, self.pools, layout.block_size, self.fp8,
                                            options)
            self.hc_pre, self.hc_post = _any_length(hc_pre, 1, options), \
                _any_length(hc_post, 4, options)

    @classmethod
    def from_pretrained(cls, path, device: str | None = None,
                        dtype: str | torch.dtype | None = None,
                        config: EngineConfig | None = None) -> V4ModelRunner:
        from dsv4.model.loader import load_model

        config = config or EngineConfig()
        if isinstance(dtype, str):
            if dtype not in TORCH_DTYPES:
                raise ValueError(f"dtype {dtype!r} is not supported; use one of "
                                 f"{sorted(TORCH_DTYPES)}")
            dtype = TORCH_DTYPES[dtype]
        kv = "fp8" if config.kv_cache_dtype == "fp8" else "auto"
        if config.compile:
            _compile_options(device)  # refuse before the weights load
        get_platform(device).configure_allocator()
        model = load_model(path, device=device, dtype=dtype, kv_cache_dtype=kv)
        return cls.for_model(model, config)

    @classmethod
    def for_model(cls, model: Transformer, config: EngineConfig) -> V4ModelRunner:
        spec = CacheSpec.from_config(model.args, config.kv_cache_dtype,
                                     num_mtp_layers=config.num_speculative_tokens)
        trained = model.args.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > trained:
            raise ValueError(f"max_model_len={config.max_model_len} is longer than this model's "
                             f"context (max_position_embeddings={trained}); use at most that")
        max_len = config.max_model_len or trained
        layout = plan_layout(spec, config.kv_cache_memory_bytes, config.max_num_seqs,
                             reference_seq_len=min(config.reference_seq_len, max_len),
                             block_size=config.block_size)
        return cls(model, layout, min(max_len, layout.max_tokens_per_seq), config.compile)

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def execute_model(self, batch: RaggedBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        if self.decode_graph is not None and is_plain_decode(batch):
            return self.decode_graph(batch)
        m = self.model
        blocks = self._query_blocks(batch)
        ids = batch.input_ids[None]  # [1, T]: the ragged batch as one flat row
        x = m.embed(ids)[:, :, None, :].expand(-1, -1, m.args.hc_mult, -1).contiguous()
        for i, layer in enumerate(m.layers):
            x = self._block(str(i), layer, x, ids, batch, blocks)
        if self.num_speculative_tokens:
            self._streams = x[0]
        return m._head(x[:, batch.logits_indices], m, m.norm)[0]  # [S, vocab] fp32

    @torch.inference_mode()
    def propose_drafts(self, batch: RaggedBatch, stream_rows: torch.Tensor) -> torch.Tensor:
        """Greedy MTP drafts [S] at `batch.logits_indices`. Token t of `batch` is the MTP's
        input at its position p: the final streams of row `stream_rows[t]` of the last
        `execute_model` (position p) and `batch.input_ids[t]`, the token at p + 1."""
        batch = batch.to(self.device)
        m, block = self.model, self.model.mtp[0]
        ids = batch.input_ids[None]
        streams = self._streams[stream_rows.to(self.device)][None]  # [1, T, n, D]
        x = block.e_proj(block.enorm(m.embed(ids)))[:, :, None, :] + \
            block.h_proj(block.hnorm(streams))
        x = self._block("mtp.0", block, x, ids, batch, self._query_blocks(batch))
        return m._head(x[:, batch.logits_indices], block, block.norm)[0].argmax(dim=-1)

    def _block(self, name: str, layer, x: torch.Tensor, ids: torch.Tensor, batch: RaggedBatch,
               blocks: list[QueryBlocks]) -> torch.Tensor:
        """One transformer block over the ragged batch; its cache pools are named `name.*`."""
        h, post, comb = self.hc_pre(x, *layer.hc_args("attn"))
        out = self._attention(name, layer.attn, layer.attn_norm(h), batch, blocks)
        x = self.hc_post(out, x, post, comb)
        h, post, comb = self.hc_pre(x, *layer.hc_args("ffn"))
        return self.hc_post(layer.ffn(layer.ffn_norm(h), ids), x, post, comb)

    @staticmethod
    def _query_blocks(batch: RaggedBatch) -> list[QueryBlocks]:
        num_new = batch.query_start_loc[1:] - batch.query_start_loc[:-1]
        long = num_new >= BAND_MIN_TOKENS
        groups = [(BAND_BLOCK, long), (1, ~long)]
        return [query_blocks(batch, size, chosen) for size, chosen in groups if bool(chosen.any())]

    def _compress(self, comp: Compressor, x, batch: RaggedBatch, inv_freq, state: str,
                  pool: str, quantize) -> None:
        """Pool each window that closes in this batch and write its entry."""
        ratio = comp.ratio
        pos = batch.positions
        kv, score = comp.project(x[0], pos)  # [T, (1 + overlap) * dim]
        closing = batch.num_closing[ratio] > 0
        if closing:  # the same idx object in every layer, so ring_context reuses its rows
            idx = batch.per_step(("closing", ratio), lambda: (
                batch.compressed_slot_mapping[ratio] >= 0).nonzero().squeeze(1))
            rows_kv, ok = ring_context(self.pools[f"{state}_kv"], kv, batch, idx)  # [E, R, C]
            rows_score, _ = ring_context(self.pools[f"{state}_score"], score, batch, idx)
        write_ring(self.pools[f"{state}_kv"], kv, batch)
        write_ring(self.pools[f"{state}_score"], score, batch)
        if not closing:  # most decode steps: no window closes, only the rings move
            return
        pooled = comp.pool_rows(rows_kv, rows_score, ok)  # [E, dim]
        cos, sin = batch.per_step(("window_rope", ratio),  # each closing window's first position
                                  lambda: rope_cos_sin(pos[idx] - ratio + 1, inv_freq))
        pooled = quantize(apply_rope(pooled, cos, sin))
        fp8 = self.fp8 and pool.endswith("compressed_kv")
        write_compressed(self.pools[pool], batch.compressed_slot_mapping[ratio], pooled, fp8=fp8)

    @staticmethod
    def _index_top(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor,
                   visible: torch.Tensor, blocks: list[QueryBlocks], k: int) -> torch.Tensor:
        """The lightning indexer's choice: each token's k visible entries of the highest
        score sum_h w * relu(q . key), ties to the lower index. q [T, h, d], keys [B, E, d]
        (each request's), w [T, h], visible [T, E] -> entry indices [T, k].

        Block by block, so a prefill block's 64 queries share one read of its request's keys
        (gathering the keys per token made a [T, E, d] copy per CSA layer: an 8,192-token
        prompt prefilled 2.6x faster without it). Blocks go in chunks whose products take
        INDEX_CHUNK_BYTES, scored, masked and cut to their top-k while in the caches: over a
        long context the whole [T, E] scores left them (2,048 tokens over 8,192 entries on a
        2-core CPU: 173 ms to score, 50 to put the scores in token order, 66 for the top-k;
        in chunks about 100 ms to score, 25 for the top-k, and only [T, k] reordered)."""
        top = q.new_empty(q.shape[0], k, dtype=torch.long)
        for b in blocks:
            block_bytes = q.element_size() * b.size * q.shape[1] * keys.shape[1]  # [size, h, E]
            per_chunk = max(1, INDEX_CHUNK_BYTES // block_bytes)
            parts = []
            for i in range(0, len(b.seq), per_chunk):
                rows = b.token_index[i:i + per_chunk]
                scores = index_scores(q[rows], keys[b.seq[i:i + per_chunk]], w[rows])
                scores.masked_fill_(~visible[rows], float("-inf"))
                parts.append(stable_topk(scores.flatten(0, 1), k))
            top[b.tokens] = torch.cat(parts)[b.slot]
        return top

    def _attention(self, name: str, attn: Attention, x: torch.Tensor, batch: RaggedBatch,
                   blocks: list[QueryBlocks]) -> torch.Tensor:
        m, T = self.model, batch.num_tokens
        H, hd, ratio = attn.n_heads, attn.head_dim, attn.ratio
        inv_freq = m._inv_freq(ratio)
        cos, sin = batch.per_step(("rope", ratio), lambda: rope_cos_sin(
            batch.positions, inv_freq))  # [T, rd/2]
        qr, q, kv = attn.project(x, cos, sin)  # [1, T, q_lora], [1, T, H, hd], [1, T, hd]
        q, kv = q[0], kv[0]
        keep_kv = (lambda t: quantize_kv_nope(t, attn.rope_dim)) if m.kv_fp8 else (lambda t: t)
        kv = keep_kv(kv)
        entries = visible = chosen = None
        if ratio:
            self._compress(attn.compressor, x, batch, inv_freq, f"{name}.compressor",
                           f"{name}.compressed_kv", lambda t: keep_kv(t.to(kv.dtype)))
            bs = self.layout.block_size
            entries, _ = gather_compressed(self.pools[f"{name}.compressed_kv"], batch, ratio, bs,
                                           fp8=self.fp8)
            entries = entries.to(kv.dtype)  # [B, E, hd]
            visible = compressed_visibility(batch, ratio, entries.shape[1])  # [T, E]
            if ratio == 4:  # the indexer's compressor advances on every token
                idx = attn.indexer
                to_key = quantize_indexer if m.indexer_fp4 else (lambda t: t)
                self._compress(idx.compressor, x, batch, inv_freq, f"{name}.index_compressor",
                               f"{name}.index_keys", to_key)
                if entries.shape[1]:
                    ikeys, _ = gather_compressed(self.pools[f"{name}.index_keys"], batch, 4, bs)
                    qi, w = idx.queries(x, qr, cos, sin, m.indexer_fp4)
                    top = self._index_top(qi[0], ikeys.float(), w[0], visible, blocks,
                                          min(idx.topk, entries.shape[1]))  # [T, k]
                    if entries.shape[1] > GATHER_TOPK_FACTOR * idx.topk:
                        # [T, k] entry rows, and whether each is visible (with fewer
                        # visible entries than k, top-k also picks masked ones)
                        chosen = top, visible.gather(1, top)
                    else:
                        visible = visible & torch.zeros_like(visible).scatter_(1, top, True)
        window = self.pools[f"{name}.window_kv"]
        out = q.new_empty(T, H, hd)
        for b in blocks:  # the window is read before this step's rows are written
            groups = [window_band(window, kv, batch, b, fp8=self.fp8)]
            if chosen is not None:  # each query's own top-k entries
                rows, ok = chosen[0][b.token_index], chosen[1][b.token_index]
                groups.append((gather_rows(entries, rows, b.seq), ok))
            elif entries is not None and entries.shape[1]:  # all entries, masked
                groups.append((entries[b.seq], visible[b.token_index]))
            o = sparse_attention(q[b.token_index], groups, attn.attn_sink, attn.scale)
            out[b.tokens] = o.flatten(0, 1)[b.slot]
        write_ring(window, kv, batch, fp8=self.fp8)
        return attn.output(out, cos, sin)[None]  # [1, T, D]


def _any_length(fn, num_streams: int, options: dict):
    """`fn` compiled for the general path's hyper-connections: ~10 elementwise ops over the
    [1, T, n, D] streams each, fused (a prefill of 32 x 64 tokens of the benchmark config
    8-26% faster in bf16 and 3% in fp32, in-process A/Bs on a 2-core CPU). Its first
    `num_streams` arguments are [1, T, ...] with T symbolic, so one graph serves every token
    count above one; the weights after them stay static (with every size symbolic, dynamo
    would tie T to a weight's equal size and compile again when they differ)."""
    compiled = torch.compile(fn, options=options)

    def call(*args):
        for t in args[:num_streams]:
            torch._dynamo.maybe_mark_dynamic(t, 1)
        return compiled(*args)
    return call


def _compile_options(device: str | None) -> dict:
    platform = get_platform(device)
    if platform.compile_options is None:
        raise ValueError(
            f"compile=True (--compile) is built and tested for the CPU only so far; on "
            f"{platform.name} leave it off, or run on the CPU (--device cpu)."
        )
    return platform.compile_options


def _check_mtp(model: Transformer, num_drafts: int) -> None:
    if len(model.mtp) < num_drafts:
        raise ValueError(
            f"num_speculative_tokens={num_drafts} needs {num_drafts} MTP layer(s), but this "
            f"checkpoint has {len(model.mtp)} (num_nextn_predict_layers); set "
            "num_speculative_tokens=0."
        )
    ratio = model.mtp[0].ratio
    if ratio:
        raise ValueError(
            f"the MTP layer has compress ratio {ratio}; MTP drafting supports window-only MTP "
            "layers (ratio 0, as in the released V4 configs). Set num_speculative_tokens=0."
        )
