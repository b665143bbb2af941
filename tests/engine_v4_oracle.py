"""Test helper: a paged runner over `transformers`' DeepSeek-V4 weights (the project's oracle).

`HFPagedRunner` runs the DeepSeek-V4 network of `transformers` (the project's oracle) through
the engine's paged cache: embeddings, mHC, norms and MoE are the oracle's own modules (they act
per token), while attention is rebuilt from the oracle's weights on top of the window rings,
compressor-state rings, compressed-entry blocks and indexer-key blocks of `paged_ops`, one
ragged batch at a time. It stands in for the runner over `dsv4.model` (written on another
branch): the engine tests run on it, so they exercise the real cache with real V4 math.
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

from dsv4.engine.batch import RaggedBatch
from dsv4.engine.kv_cache import CacheSpec, KVCacheLayout
from dsv4.engine.paged_ops import (
    compressed_visibility,
    gather_compressed,
    ring_context,
    write_compressed,
    write_ring,
)
from dsv4.engine.runner import ModelRunner
from dsv4.quant.kv import pack_kv_fp8, unpack_kv_fp8

VOCAB, WINDOW, HEAD_DIM = 256, 8, 64
RATIOS = (0, 4, 128, 4)


def make_model(head_dim: int = HEAD_DIM, rope_head_dim: int = 16, index_head_dim: int = 32):
    """Tiny random V4; head_dim=512, rope_head_dim=64 gives the released KV entry format
    (index_head_dim must then be >= 64, the RoPE width the indexer shares)."""
    cfg = transformers.DeepseekV4Config(
        vocab_size=VOCAB,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=head_dim,
        q_lora_rank=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        o_groups=2,
        o_lora_rank=32,
        index_n_heads=8,
        index_head_dim=index_head_dim,
        index_topk=4,
        sliding_window=WINDOW,
        compress_ratios=list(RATIOS),
        num_hash_layers=1,
        qk_rope_head_dim=rope_head_dim,
        max_position_embeddings=4096,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    # random init leaves compressor position biases and sinks near 0; make them matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "sinks")):
                p.normal_(0, 1.0)
    return model


SPEC = CacheSpec(
    num_hidden_layers=4,
    compress_ratios=RATIOS,
    sliding_window=WINDOW,
    head_dim=HEAD_DIM,
    qk_rope_head_dim=16,
    index_head_dim=32,
)
# the released entry geometry, for real fp8 storage (584-byte entries)
SPEC_FP8 = CacheSpec(
    num_hidden_layers=4,
    compress_ratios=RATIOS,
    sliding_window=WINDOW,
    head_dim=512,
    qk_rope_head_dim=64,
    index_head_dim=128,
    kv_cache_dtype="fp8",
)


class HFPagedRunner(ModelRunner):
    """V4 forward over a ragged batch with the paged cache (see the module docstring)."""

    def __init__(self, model, layout: KVCacheLayout, quantize_kv: bool | None = None) -> None:
        self.model = model
        self.layout = layout
        self.vocab_size = VOCAB
        self.eos_token_id = 1
        self.fp8 = layout.spec.kv_cache_dtype == "fp8"
        # use KV entries as the fp8 format holds them (the reference's QAT forward does this
        # with any cache); quantize_kv=True with a bf16 layout simulates it in fp32 pools
        self.quantize_kv = self.fp8 if quantize_kv is None else quantize_kv
        # fp32 pools (the oracle runs in fp32) except the packed uint8 fp8 KV pools
        self.pools = {
            name: torch.zeros(shape, dtype=torch.uint8 if dtype == torch.uint8 else torch.float32)
            for name, (shape, dtype) in layout.pool_shapes().items()
        }

    @torch.no_grad()
    def execute_model(self, batch: RaggedBatch) -> torch.Tensor:
        m = self.model.model
        ids = batch.input_ids[None]  # [1, T]: the ragged batch as one flat row
        x = m.embed_tokens(ids)  # [1, T, D]
        h = x.unsqueeze(2).expand(-1, -1, m.config.hc_mult, -1).contiguous()  # [1, T, n, D]
        for i, layer in enumerate(m.layers):
            post, comb, collapsed = layer.attn_hc(h)
            out = self._attention(i, layer.self_attn, layer.input_layernorm(collapsed), batch)
            h = post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), h)
            post, comb, collapsed = layer.ffn_hc(h)
            out = layer.mlp(layer.post_attention_layernorm(collapsed), input_ids=ids)
            h = post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), h)
        h = m.norm(m.hc_head(h))[0, batch.logits_indices]  # [S, D]
        return self.model.lm_head(h).float()

    def _kv_format(self, kv: torch.Tensor) -> torch.Tensor:
        """KV entries as the fp8 format holds them, so fresh and cached entries agree."""
        if not self.quantize_kv:
            return kv
        return unpack_kv_fp8(pack_kv_fp8(kv)).to(kv.dtype)

    def _rope(self, x: torch.Tensor, batch: RaggedBatch, kind: str):
        return self.model.model.rotary_emb(x, position_ids=batch.positions[None], layer_type=kind)

    def _compress(self, comp, x, batch, ratio, state: str, pool: str, dim: int) -> None:
        """Run a compressor over the batch: pool each closed window, write its entry."""
        pos = batch.positions
        kv = comp.kv_proj(x)[0]  # [T, (1 + overlap) * dim]
        gate = comp.gate_proj(x)[0] + comp.position_bias[pos % ratio]
        closing = batch.compressed_slot_mapping[ratio] >= 0
        idx = closing.nonzero().squeeze(1)
        rows_kv, ok = ring_context(self.pools[f"{state}_kv"], kv, batch, idx)  # [E, R, C]
        rows_g, _ = ring_context(self.pools[f"{state}_score"], gate, batch, idx)
        write_ring(self.pools[f"{state}_kv"], kv, batch)
        write_ring(self.pools[f"{state}_score"], gate, batch)
        if rows_kv.shape[1] == 2 * ratio:  # overlap: previous window's Ca, own window's Cb
            rows_kv = torch.cat([rows_kv[:, :ratio, :dim], rows_kv[:, ratio:, dim:]], dim=1)
            rows_g = torch.cat([rows_g[:, :ratio, :dim], rows_g[:, ratio:, dim:]], dim=1)
        rows_g = rows_g.masked_fill(~ok[..., None], float("-inf"))
        pooled = comp.kv_norm((rows_kv * rows_g.softmax(dim=1)).sum(dim=1))  # [E, dim]
        first = (pos[idx] - ratio + 1)[None]  # RoPE at each window's first position
        cos, sin = self.model.model.rotary_emb(pooled, position_ids=first, layer_type="compress")
        pooled = apply_rotary_pos_emb(pooled[None, None], cos, sin)[0, 0]
        is_kv = pool.endswith("compressed_kv")  # indexer keys stay unquantised
        if is_kv:
            pooled = self._kv_format(pooled)
        fp8 = self.fp8 and is_kv
        write_compressed(self.pools[pool], batch.compressed_slot_mapping[ratio], pooled, fp8=fp8)

    def _attention(self, i: int, attn, x: torch.Tensor, batch: RaggedBatch) -> torch.Tensor:
        T, ratio = batch.num_tokens, RATIOS[i]
        num_heads, hd = attn.num_heads, attn.head_dim
        cos, sin = self._rope(x, batch, attn.rope_layer_type)
        q_res = attn.q_a_norm(attn.q_a_proj(x))  # [1, T, q_lora]
        q = attn.q_b_norm(attn.q_b_proj(q_res).view(1, T, num_heads, hd).transpose(1, 2))
        q = apply_rotary_pos_emb(q, cos, sin)[0].transpose(0, 1)  # [T, H, hd]
        kv = attn.kv_norm(attn.kv_proj(x)).view(1, T, 1, hd).transpose(1, 2)
        kv = self._kv_format(apply_rotary_pos_emb(kv, cos, sin)[0, 0])  # [T, hd]
        keys, ok = ring_context(self.pools[f"{i}.window_kv"], kv, batch, fp8=self.fp8)
        write_ring(self.pools[f"{i}.window_kv"], kv, batch, fp8=self.fp8)
        if ratio:
            comp = attn.compressor
            self._compress(comp, x, batch, ratio, f"{i}.compressor", f"{i}.compressed_kv", hd)
            bs = self.layout.block_size
            entries, _ = gather_compressed(
                self.pools[f"{i}.compressed_kv"], batch, ratio, bs, fp8=self.fp8
            )
            entries = entries.float()
            visible = compressed_visibility(batch, ratio, entries.shape[1])  # [T, E]
            if ratio == 4:  # the indexer's compressor state must advance on every token
                idx = comp.indexer
                self._compress(
                    idx, x, batch, 4, f"{i}.index_compressor", f"{i}.index_keys", idx.head_dim
                )
            if ratio == 4 and entries.shape[1]:
                ikeys, _ = gather_compressed(self.pools[f"{i}.index_keys"], batch, 4, bs)
                icos, isin = self._rope(x, batch, "compress")
                qi = idx.q_b_proj(q_res).view(1, T, idx.num_heads, idx.head_dim).transpose(1, 2)
                qi = apply_rotary_pos_emb(qi, icos, isin)[0].transpose(0, 1)  # [T, IH, id]
                scores = torch.einsum("thd,ted->the", qi, ikeys[batch.seq_index]).relu()
                weights = idx.scorer.weights_proj(x)[0] * idx.scorer.weights_scaling  # [T, IH]
                scores = (scores * idx.scorer.softmax_scale * weights[..., None]).sum(1)
                scores = scores.masked_fill(~visible, float("-inf"))  # [T, E]
                # ReLU scores tie (at 0) easily in a tiny model: break ties by entry index so
                # the choice does not depend on how many entries the batch holds
                k = min(idx.index_topk, scores.shape[1])
                top = scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]
                chosen = torch.zeros_like(visible).scatter_(1, top, True)
                visible = visible & chosen
            keys = torch.cat([keys, entries[batch.seq_index]], dim=1)  # [T, W + E, hd]
            ok = torch.cat([ok, visible], dim=1)
        logits = torch.einsum("thd,tkd->thk", q, keys) * attn.scaling  # [T, H, K]
        logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
        sink = attn.sinks.view(1, num_heads, 1).expand(T, -1, -1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
        out = torch.einsum("thk,tkd->thd", probs, keys)  # [T, H, hd], V = K
        out = apply_rotary_pos_emb(out.transpose(0, 1)[None], cos, -sin)[0].transpose(0, 1)
        grouped = out.reshape(1, T, attn.config.o_groups, -1)
        return attn.o_b_proj(attn.o_a_proj(grouped).flatten(2))  # [1, T, D]


def make_engine(model, budget=512, num_blocks=64, max_num_seqs=64, tokenizer=None, spec=SPEC):
    """An LLMEngine over HFPagedRunner with 128-token blocks and one slot per sequence."""
    from dsv4.engine.llm_engine import LLMEngine

    layout = KVCacheLayout(
        spec, block_size=128, num_blocks=num_blocks, num_state_slots=max_num_seqs
    )
    return LLMEngine(
        HFPagedRunner(model, layout),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=2048,
        tokenizer=tokenizer,
    )


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (L,), generator=g).tolist() for L in lens]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()
