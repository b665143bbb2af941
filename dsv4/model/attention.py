"""V4 attention: one shared KV vector per token (K = V) read by every query head, over
[the last `window` tokens] + [compressed entries: all visible ones (HCA, ratio 128) or the
top-k picked by the lightning indexer (CSA, ratio 4)], with a learned per-head sink.

Every query gathers its own keys (window slice + selected entries), so prefill costs
S * (window + top-k), never S x S. The same code serves a full forward (no cache), prefill
into a cache, chunked prefill and one-token decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.cache import LayerCache
from dsv4.model.compressor import Compressor
from dsv4.model.config import ModelArgs
from dsv4.model.fusion import fuse_linears, linear, packed_for_kernels
from dsv4.model.norm import RMSNorm, rms_normalize
from dsv4.model.rope import apply_rope, rope_cos_sin
from dsv4.quant.act import fp4_roundtrip, fp8_roundtrip, hadamard_rotate
from dsv4.quant.kv import pack_kv_fp8, unpack_kv_fp8

QUERY_CHUNK = 128  # queries per step; bounds memory at chunk * (2 window + top-k) * head_dim


def quantize_kv_nope(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The reference's FP8 treatment of a KV vector: non-RoPE dims through e4m3 (block 64),
    RoPE dims in bf16: exactly the values a 584-byte FP8 cache entry can hold."""
    rope = kv[..., -rope_dim:].to(torch.bfloat16).to(kv.dtype)
    return torch.cat([fp8_roundtrip(kv[..., :-rope_dim], 64), rope], dim=-1)


def quantize_indexer(x: torch.Tensor) -> torch.Tensor:
    """Hadamard rotation then FP4 e2m1 (block 32), as the reference does for indexer q and k."""
    return fp4_roundtrip(hadamard_rotate(x), 32)


def sparse_attention(
    q: torch.Tensor,
    groups: list[tuple[torch.Tensor, torch.Tensor]],
    sink: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of q [B, T, H, D] over several key groups (K = V) with one softmax and a
    per-head sink [H] that enters only the denominator.

    Each group is (keys, valid): keys [B, K, D] shared by all T queries (a window band, all
    HCA entries) or [B, T, K, D] gathered per query (the indexer's top-k); valid broadcasts
    to [B, T, K]. -> [B, T, H, D]."""
    if q.dtype == torch.float32 and all(keys.dim() == 3 for keys, _ in groups):
        return _shared_key_attention(q, groups, sink, scale)
    logits = []
    for keys, valid in groups:
        eq = "bthd,btkd->bthk" if keys.dim() == 4 else "bthd,bkd->bthk"
        scores = torch.einsum(eq, q, keys).float() * scale
        logits.append(scores.masked_fill(~valid[:, :, None, :], float("-inf")))
    sinks = sink.float().view(1, 1, -1, 1).expand(*logits[0].shape[:3], 1)
    probs = torch.softmax(torch.cat([*logits, sinks], dim=-1), dim=-1)
    out, offset = None, 0
    for (keys, _), scores in zip(groups, logits):
        p = probs[..., offset : offset + scores.shape[-1]].to(keys.dtype)
        offset += scores.shape[-1]
        eq = "bthk,btkd->bthd" if keys.dim() == 4 else "bthk,bkd->bthd"
        part = torch.einsum(eq, p, keys)
        out = part if out is None else out + part
    return out


def _shared_key_attention(q, groups, sink, scale) -> torch.Tensor:
    """`sparse_attention` when every group's keys are shared by all T queries, in float32.

    There is one KV head, so the T * H (query, head) rows form one query sequence against one
    key sequence, and torch's fused attention (`scaled_dot_product_attention`: the scores are
    never materialised whole) runs it. The sink is one more key, zero, with a zero value and
    its logit as the bias: it adds exp(sink) to the denominator and nothing to the sum. For
    the engine's 64-query prefill blocks this took half the time of the einsums on a 2-core
    CPU; it is not bitwise the same (about 1e-6 apart). bf16 keeps the einsums, whose softmax
    runs in float32 (a bf16 bias would round the sink)."""
    B, T, H, D = q.shape
    keys = torch.cat([*(k.expand(B, -1, -1) for k, _ in groups), q.new_zeros(B, 1, D)], 1)
    valid = torch.cat([v.expand(B, T, -1) for _, v in groups], dim=-1)  # [B, T, K]
    masked = q.new_zeros(B, T, 1, valid.shape[-1]).masked_fill_(~valid[:, :, None], float("-inf"))
    bias = torch.cat([masked.expand(-1, -1, H, -1), sink.view(1, 1, H, 1).expand(B, T, H, 1)], -1)
    keys = keys[:, None]  # [B, 1, K + 1, D]
    out = F.scaled_dot_product_attention(q.reshape(B, 1, T * H, D), keys, keys,
                                         attn_mask=bias.view(B, 1, T * H, -1), scale=scale)
    return out.view(B, T, H, D)


def gather_rows(x: torch.Tensor, index: torch.Tensor,
                seq: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N, D], index [M, T, K] (any value; clamp first) -> [M, T, K, D]: row
    index[m, t, k] of sequence seq[m]. Without seq, M is B (sequence m) or 1 (one index for
    every sequence).

    Whole rows by `index_select` over x's flattened rows: `torch.gather` with the index
    expanded over D looks up an index per element, 8.6x slower in bf16 (3 ms -> 0.35 ms a
    block of 64 queries' top-64 of 2,048 entries on a 2-core CPU), where an 8,192-token
    prompt spent a third of its prefill. With seq, no [M, N, D] copy of x is made either."""
    B, N, D = x.shape
    if seq is None:
        seq = torch.arange(B, device=x.device)
    rows = index.clamp(0, max(N - 1, 0)) + seq[:, None, None] * N
    return x.reshape(B * N, D).index_select(0, rows.flatten()).view(*rows.shape, D)


def stable_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the lower index. ReLU makes exact ties (at 0)
    common; resolving them by position keeps the choice independent of how many entries
    the call happened to see, so chunked, batched and full forwards pick the same entries.

    Subtracting index * 1e-300 in float64 separates exact ties and is below the precision of
    any nonzero float32 score, so it changes nothing else (and costs O(N), unlike a sort)."""
    index = torch.arange(score.shape[-1], device=score.device, dtype=torch.float64)
    keyed = score.to(torch.float64, copy=True).sub_(index * 1e-300)  # in place: one pass less
    return keyed.topk(k, dim=-1).indices


def index_scores(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The lightning indexer's sum over heads of w * ReLU(q . key): q [B, T, h, d], keys
    [B, N, d], w [B, T, h] -> [B, T, N]. Two products: every head's q . key at once, then the
    weighted sum over heads. Their [B, T * h, N] middle is h times the output: callers keep
    T * N small enough for it to stay in the caches (the engine's INDEX_CHUNK_BYTES)."""
    B, T, h, _ = q.shape
    N = keys.shape[1]
    products = torch.relu_(torch.bmm(q.flatten(1, 2), keys.transpose(1, 2)))  # [B, T * h, N]
    return torch.bmm(w.reshape(B * T, 1, h), products.view(B * T, h, N)).view(B, T, N)


class Indexer(nn.Module):
    """Lightning indexer: score(t, s) = sum_h w_{t,h} ReLU(q_{t,h} . k_s), keep the top-k."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = (
            args.index_n_heads,
            args.index_head_dim,
            args.index_topk,
        )
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(args.hidden_size, self.head_dim, 4, args.rms_norm_eps)
        self.register_buffer("_wq_b_packed", None, persistent=False)  # see fuse_projections

    def fuse_projections(self) -> None:
        """For inference: its compressor's products as one, wq_b through the CPU kernels
        where they run (`linear`)."""
        self.compressor.fuse_projections()
        self._wq_b_packed = packed_for_kernels(self.wq_b.weight)

    def queries(self, x, qr, cos, sin, fp4: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], qr [B, T, q_lora_rank], cos/sin [T, rd/2] -> (queries [B, T, h, d]
        float32, rotated, FP4 values if `fp4`; head weights [B, T, h] float32, scaled)."""
        B, T, _ = x.shape
        q = linear(qr, self.wq_b.weight, self._wq_b_packed)
        q = q.view(B, T, self.n_heads, self.head_dim).float()
        q = apply_rope(q, cos[:, None], sin[:, None])
        if fp4:
            q = quantize_indexer(q)
        return q, self.weights_proj(x).float() * (self.head_dim**-0.5 * self.n_heads**-0.5)

    def forward(self, x, qr, positions, inv_freq, cache: LayerCache | None, fp4: bool):
        """-> (top-k entry indices [B, T, k] with -1 for none, all indexer keys so far)."""
        B, T, _ = x.shape
        start_pos = int(positions[0])
        new_keys = self.compressor(x, start_pos, inv_freq, cache and cache.index_compressor)
        if fp4:
            new_keys = quantize_indexer(new_keys)
        keys = new_keys
        if cache is not None and cache.index_keys is not None:
            keys = cache.index_keys  # [B, N, dI]
            if new_keys.shape[1]:  # copy only when a window closed
                keys = torch.cat([keys, new_keys], dim=1)
        cos, sin = rope_cos_sin(positions, inv_freq)
        q, w = self.queries(x, qr, cos, sin, fp4)
        visible = (positions + 1) // 4  # entries a query may see
        num_keys = keys.shape[1]
        k = min(self.topk, num_keys)
        keys_f32, entry = keys.float(), torch.arange(num_keys, device=x.device)
        chunks = []
        for s in range(0, T, QUERY_CHUNK):
            e = min(s + QUERY_CHUNK, T)
            score = index_scores(q[:, s:e], keys_f32, w[:, s:e])  # [B, t, N]
            future = entry >= visible[s:e, None]
            score = score.masked_fill(future, float("-inf"))
            top = stable_topk(score, k)
            chunks.append(torch.where(top >= visible[s:e, None], -1, top))
        return torch.cat(chunks, dim=1), keys


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, ratio: int):
        super().__init__()
        self.args, self.ratio = args, ratio
        H, hd = args.num_attention_heads, args.head_dim
        self.n_heads, self.head_dim, self.rope_dim = H, hd, args.qk_rope_head_dim
        self.window, self.scale, self.eps = args.sliding_window, hd**-0.5, args.rms_norm_eps
        self.wq_a = nn.Linear(args.hidden_size, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        self.wkv = nn.Linear(args.hidden_size, hd, bias=False)
        self.kv_norm = RMSNorm(hd, args.rms_norm_eps)
        self.wo_a = nn.Linear(H * hd // args.o_groups, args.o_groups * args.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, args.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        if ratio:
            self.compressor = Compressor(args.hidden_size, hd, ratio, args.rms_norm_eps)
        if ratio == 4:
            self.indexer = Indexer(args)
        for name in ("_wq_a_kv", "_wq_a_kv_packed", "_wq_b_packed", "_wo_b_packed"):
            self.register_buffer(name, None, persistent=False)  # see fuse_projections

    def fuse_projections(self) -> None:
        """For inference: the products that read the attention input x as one
        (`fuse_linears`): wq_a with wkv, and each compressor's wkv with its wgate; the bf16
        products through the CPU kernels where they run (`linear`)."""
        self._wq_a_kv = fuse_linears(self.wq_a, self.wkv)
        self._wq_a_kv_packed = packed_for_kernels(self._wq_a_kv)
        self._wq_b_packed = packed_for_kernels(self.wq_b.weight)
        self._wo_b_packed = packed_for_kernels(self.wo_b.weight)
        if self.ratio == 4:
            self.indexer.fuse_projections()
        if self.ratio:
            self.compressor.fuse_projections()

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        cache: LayerCache | None,
        kv_fp8: bool,
        indexer_fp4: bool,
    ) -> torch.Tensor:
        T, W = x.shape[1], self.window
        start_pos = int(positions[0])
        cos, sin = rope_cos_sin(positions, inv_freq)  # [T, rd/2]
        qr, q, kv = self.project(x, cos, sin)
        if kv_fp8:
            kv = quantize_kv_nope(kv, self.rope_dim)

        # Window: keys at positions p - W + 1 .. p, from the ring (earlier chunks) and kv.
        num_prior = min(start_pos, W - 1) if cache is not None else 0
        recent = kv
        if num_prior:
            slots = torch.arange(start_pos - num_prior, start_pos, device=x.device) % W
            recent = torch.cat([self._read(cache.window[:, slots], kv.dtype), kv], dim=1)
        recent_start = start_pos - num_prior

        # Compressed entries visible to each query: all (HCA) or the indexer's top-k (CSA).
        comp_idx = comp_valid = entries = new = None
        if self.ratio:
            new = self.compressor(x, start_pos, inv_freq, cache and cache.compressor)
            if kv_fp8:
                new = quantize_kv_nope(new, self.rope_dim)
            new = new.to(kv.dtype)
            entries = new
            if cache is not None and cache.compressed is not None:
                entries = self._read(cache.compressed, new.dtype)
                if new.shape[1]:
                    entries = torch.cat([entries, new], dim=1)
            if self.ratio == 4:
                comp_idx, keys = self.indexer(x, qr, positions, inv_freq, cache, indexer_fp4)
                comp_valid = comp_idx >= 0
                if cache is not None:
                    cache.index_keys = keys
            else:  # HCA: every entry whose window closed at or before the query
                entry = torch.arange(entries.shape[1], device=x.device)
                comp_valid = (entry < ((positions + 1) // self.ratio)[:, None])[None]

        out = []
        for s in range(0, T, QUERY_CHUNK):
            e = min(s + QUERY_CHUNK, T)
            # the window of this query chunk is one contiguous band of `recent`
            local = positions[s:e] - recent_start  # [t] index of each query in `recent`
            lo, hi = max(int(local[0]) - W + 1, 0), int(local[-1]) + 1
            band = torch.arange(lo, hi, device=x.device)
            in_window = (band[None] <= local[:, None]) & (band[None] > local[:, None] - W)
            groups = [(recent[:, lo:hi], in_window[None])]
            if entries is not None and entries.shape[1]:
                if self.ratio == 4:
                    groups.append((gather_rows(entries, comp_idx[:, s:e]), comp_valid[:, s:e]))
                else:
                    groups.append((entries, comp_valid[:, s:e]))
            out.append(sparse_attention(q[:, s:e], groups, self.attn_sink, self.scale))
        if cache is not None:
            self._update_cache(cache, kv, positions, new, kv_fp8)
        return self.output(torch.cat(out, dim=1), cos, sin)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, D], cos/sin [T, rd/2] -> (qr [B, T, q_lora_rank], the indexer's input too;
        queries [B, T, H, hd], normalised per head and rotated; the KV vectors [B, T, hd],
        rotated)."""
        B, T, _ = x.shape
        if self._wq_a_kv is not None:
            qr, kv = linear(x, self._wq_a_kv, self._wq_a_kv_packed).split(
                [self.args.q_lora_rank, self.head_dim], -1)
        else:
            qr, kv = self.wq_a(x), self.wkv(x)
        qr = self.q_norm(qr)
        q = linear(qr, self.wq_b.weight, self._wq_b_packed)
        q = rms_normalize(q.view(B, T, self.n_heads, self.head_dim), self.eps)
        q = apply_rope(q.to(x.dtype), cos[:, None], sin[:, None])
        return qr, q, apply_rope(self.kv_norm(kv), cos, sin)

    def output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention outputs o [..., T, H, hd] of queries rotated by cos/sin [T, rd/2] ->
        [..., T, D]: the rotation undone, then the grouped low-rank output projection."""
        o = apply_rope(o, cos[:, None], -sin[:, None])
        g = self.args.o_groups
        wo_a = self.wo_a.weight.view(g, self.args.o_lora_rank, -1)
        o = torch.einsum("...gd,grd->...gr", o.flatten(-2).unflatten(-1, (g, -1)), wo_a)
        return linear(o.flatten(-2), self.wo_b.weight, self._wo_b_packed)

    def _read(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if stored.dtype == torch.uint8:  # real FP8 entries
            return unpack_kv_fp8(stored, dtype, self.head_dim, self.rope_dim)
        return stored.to(dtype)

    def _store(self, kv: torch.Tensor, kv_fp8: bool) -> torch.Tensor:
        return pack_kv_fp8(kv, self.rope_dim) if kv_fp8 else kv

    def _update_cache(self, cache: LayerCache, kv, positions, new, kv_fp8: bool) -> None:
        if cache.window is None:
            width = self._store(kv[:, :1], kv_fp8).shape[-1]
            dtype = torch.uint8 if kv_fp8 else kv.dtype
            cache.window = kv.new_zeros(kv.shape[0], self.window, width, dtype=dtype)
        keep = min(kv.shape[1], self.window)
        cache.window[:, positions[-keep:] % self.window] = self._store(kv[:, -keep:], kv_fp8)
        if new is not None and (cache.compressed is None or new.shape[1]):
            stored = self._store(new, kv_fp8)
            old = cache.compressed
            cache.compressed = stored if old is None else torch.cat([old, stored], dim=1)
