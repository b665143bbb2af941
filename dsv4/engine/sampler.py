"""Batched token sampling with per-row parameters.

All the math runs on `[N, vocab]` tensors at once; the only per-row Python work is drawing one
uniform number for each seeded row from its own generator.

Reproducibility: a seeded request's row at its k-th generated token draws one uniform number
from a fresh `torch.Generator` seeded with `mix(seed, k)`, and picks its token by inverting the
cumulative distribution of its own (truncated) probabilities. The uniform depends only on
(seed, k), and every step is row-wise (whether a row uses the top-1024 candidate shortcut is
decided from that row alone), so the same seed and logits row give the same token whatever
else is in the batch and wherever the row sits in it.

Logprobs are those of the model's raw distribution: `log_softmax(logits)` before penalties,
temperature, top-k/top-p/min-p (vLLM's default "raw_logprobs").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.engine.sampling_params import SamplingParams

_MASK = float("-inf")


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator determined by (request seed, index of the token being generated)."""
    # splitmix64-style mixing so that (seed, step) and (seed + 1, step - 1) do not collide.
    x = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return torch.Generator(device="cpu").manual_seed(x & 0x7FFFFFFFFFFFFFFF)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per step for the rows to sample."""

    temperature: torch.Tensor  # [N] fp32, 0 = greedy
    top_p: torch.Tensor  # [N] fp32
    top_k: torch.Tensor  # [N] int64, vocab size where disabled
    min_p: torch.Tensor  # [N] fp32
    presence_penalty: torch.Tensor  # [N] fp32
    frequency_penalty: torch.Tensor  # [N] fp32
    repetition_penalty: torch.Tensor  # [N] fp32
    # Token ids padded with V (an extra, dropped column): penalties touch only these entries,
    # O(N x length) work instead of O(N x vocab).
    output_ids: torch.Tensor | None  # [N, L] int64: generated tokens (presence, frequency)
    seen_ids: torch.Tensor | None  # [N, L'] int64: prompt + generated tokens (repetition)
    banned_mask: torch.Tensor | None  # [N, V] bool: stop tokens banned until min_tokens
    generators: list[torch.Generator | None]  # per row; None = shared stream
    num_logprobs: list[int | None]  # per row, as in SamplingParams.logprobs

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        vocab_size: int,
        eos_token_id: int | None = None,
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        """Collect the rows' parameters; `output_ids[i]` are row i's tokens generated so far."""
        n = len(params)

        def col(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        need_counts = any(p.presence_penalty or p.frequency_penalty for p in params)
        need_seen = any(p.repetition_penalty != 1.0 for p in params)
        out_ids = _padded_ids(output_ids, vocab_size, device) if need_counts else None
        seen_ids = None
        if need_seen:
            both = [a + b for a, b in zip(prompt_ids, output_ids)]
            seen_ids = _padded_ids(both, vocab_size, device)
        banned_mask = None
        banned_rows = []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_tokens:
                ids = list(p.stop_token_ids)
                if eos_token_id is not None and not p.ignore_eos:
                    ids.append(eos_token_id)
                banned_rows.append((i, ids))
        if banned_rows:
            banned_mask = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            for i, ids in banned_rows:
                banned_mask[i, [t for t in ids if t < vocab_size]] = True
        return cls(
            temperature=col([p.temperature for p in params]),
            top_p=col([p.top_p for p in params]),
            top_k=col(top_k, torch.int64),
            min_p=col([p.min_p for p in params]),
            presence_penalty=col([p.presence_penalty for p in params]),
            frequency_penalty=col([p.frequency_penalty for p in params]),
            repetition_penalty=col([p.repetition_penalty for p in params]),
            output_ids=out_ids,
            seen_ids=seen_ids,
            banned_mask=banned_mask,
            generators=[
                None if p.seed is None else seeded_generator(p.seed, len(out))
                for p, out in zip(params, output_ids)
            ],
            num_logprobs=[p.logprobs for p in params],
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] fp32, raw logprob of the chosen token
    top_token_ids: torch.Tensor | None  # [N, K] int64, K = max logprobs asked in the batch
    top_logprobs: torch.Tensor | None  # [N, K] fp32


def _padded_ids(ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[N, max len] int64, padded with `vocab_size`."""
    width = max((len(x) for x in ids), default=0)
    padded = torch.full((len(ids), max(width, 1)), vocab_size, dtype=torch.int64)
    for i, row in enumerate(ids):
        if row:
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return padded.to(device)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, presence, frequency penalties and the min_tokens ban. logits: [N, V] fp32.

    Works on the logits of the tokens that occurred only (gather, change, scatter back);
    a token listed twice is written twice with the same value.
    """
    if batch.seen_ids is None and batch.output_ids is None and batch.banned_mask is None:
        return logits
    vocab = logits.shape[-1]
    ext = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)  # [N, V + 1]
    if batch.seen_ids is not None:
        vals = ext.gather(1, batch.seen_ids)
        rep = batch.repetition_penalty[:, None]
        ext.scatter_(1, batch.seen_ids, torch.where(vals > 0, vals / rep, vals * rep))
    if batch.output_ids is not None:
        vals = ext.gather(1, batch.output_ids)
        ext.scatter_(1, batch.output_ids, vals - batch.presence_penalty[:, None])
        freq = batch.frequency_penalty[:, None].expand_as(batch.output_ids)
        ext.scatter_add_(1, batch.output_ids, -freq)  # once per occurrence
    logits = ext[:, :vocab]
    if batch.banned_mask is not None:
        logits = logits.masked_fill(batch.banned_mask, _MASK)
    return logits


# Truncated sampling first looks at each row's CANDIDATES most likely tokens: a top-k, top-p or
# min-p set lies inside them whenever the row's own numbers say so (checked per row), and then
# no full-vocabulary sort is needed (on CPU a 129k-wide sort of 64 rows takes ~350 ms, a
# top-1024 ~30 ms).
CANDIDATES = 1024


def allowed_prefix(
    sorted_probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    top_k_mass: torch.Tensor,
) -> torch.Tensor:
    """Keep-mask over probabilities sorted in descending order. [n, L] -> [n, L] bool.

    top-k keeps the first k; top-p keeps a token while the (top-k renormalised) mass strictly
    before it is below top_p, so the first always stays; min-p keeps tokens with probability
    >= min_p x the largest. `top_k_mass` [n] is the total probability of the top-k set.
    """
    ranks = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)[None, :]
    keep = ranks < top_k[:, None]
    kept = sorted_probs * keep
    mass_before = (kept.cumsum(dim=-1) - kept) / top_k_mass[:, None]
    keep &= (mass_before < top_p[:, None]) | (ranks == 0)
    keep &= sorted_probs >= min_p[:, None] * sorted_probs[:, :1]
    return keep


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row's (unnormalised) weights with one uniform per row. [n, L]."""
    cdf = weights.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=weights.shape[-1] - 1)


def _uniforms(batch: SamplingBatch, rows: list[int], device) -> torch.Tensor:
    """One U(0,1) per row: from the row's own generator when seeded, else the shared stream."""
    u = torch.rand(len(rows))
    for j, i in enumerate(rows):
        gen = batch.generators[i]
        if gen is not None:
            u[j] = torch.rand(1, generator=gen)
    return u.to(device)


def _sample_rows(logits: torch.Tensor, batch: SamplingBatch, rows: list[int]) -> torch.Tensor:
    """Sample the non-greedy rows. logits: [n, V] penalised, for batch rows `rows`."""
    vocab = logits.shape[-1]
    idx = torch.tensor(rows, device=logits.device)
    top_k, top_p, min_p = batch.top_k[idx], batch.top_p[idx], batch.min_p[idx]
    probs = (logits / batch.temperature[idx][:, None]).softmax(dim=-1)  # [n, V]
    u = _uniforms(batch, rows, logits.device)
    out = torch.empty(len(rows), dtype=torch.int64, device=logits.device)

    truncated = (top_k < vocab) | (top_p < 1.0) | (min_p > 0)
    plain = (~truncated).nonzero().squeeze(1)
    if plain.numel():
        out[plain] = _inverse_cdf(probs[plain], u[plain])
    if not bool(truncated.any()):
        return out

    # Try the top CANDIDATES, then 16x as many, then the whole (sorted) vocabulary. A row moves
    # on only if its allowed set may not fit, which is decided from the row alone.
    no_top_k = top_k >= vocab
    pending = truncated.nonzero().squeeze(1)
    for num_cand in sorted({min(CANDIDATES, vocab), min(16 * CANDIDATES, vocab), vocab}):
        cand_p, cand_ids = probs[pending].topk(num_cand, dim=-1)  # [m, K], descending
        k, tp, mp, off = top_k[pending], top_p[pending], min_p[pending], no_top_k[pending]
        # The allowed tokens are a prefix of the sorted order; it lies in the candidates if
        # top-k <= K, or (top-k off) the candidates hold top_p of the mass or end below min-p.
        fits = (k <= num_cand) | (
            off
            & (
                ((tp < 1.0) & (cand_p.sum(dim=-1) >= tp))
                | ((mp > 0) & (cand_p[:, -1] < mp * cand_p[:, 0]))
            )
        )
        sel = fits.nonzero().squeeze(1)
        if sel.numel():
            p, k = cand_p[sel], k[sel]
            ranks = torch.arange(num_cand, device=p.device)[None, :]
            top_k_mass = torch.where(
                off[sel], torch.ones_like(p[:, 0]), (p * (ranks < k[:, None])).sum(dim=-1)
            )
            keep = allowed_prefix(p, k, tp[sel], mp[sel], top_k_mass)
            pick = _inverse_cdf(p * keep, u[pending[sel]])
            out[pending[sel]] = cand_ids[sel].gather(1, pick[:, None]).squeeze(1)
        pending = pending[~fits]
        if not pending.numel():
            break
    return out


def argmax_only(params: list[SamplingParams], output_ids: list[list[int]]) -> bool:
    """Whether every row's token is its logits' plain argmax with nothing else asked: greedy,
    no penalties, no stop tokens banned by min_tokens, no logprobs. Such a batch (greedy
    serving, benchmarks) skips `SamplingBatch.build`: ~0.15 ms of a 32-request step."""
    return all(p.temperature == 0.0 and p.logprobs is None and not p.presence_penalty
               and not p.frequency_penalty and p.repetition_penalty == 1.0
               and len(out) >= p.min_tokens for p, out in zip(params, output_ids))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Pick one token per row. logits: [N, V] (any float dtype); rows follow `batch`."""
    logits = logits.float()
    max_logprobs = max((k for k in batch.num_logprobs if k is not None), default=None)
    raw_logprobs = logits.log_softmax(dim=-1) if max_logprobs is not None else None

    logits = apply_penalties(logits, batch)
    tokens = logits.argmax(dim=-1)  # greedy rows keep this exact argmax
    rows = (batch.temperature > 0).nonzero().squeeze(1).tolist()
    if rows:
        tokens[rows] = _sample_rows(logits[rows], batch, rows)

    if raw_logprobs is None:
        return SamplerOutput(tokens, None, None, None)
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    top_logprobs, top_ids = (
        raw_logprobs.topk(max_logprobs, dim=-1) if max_logprobs else (None, None)
    )
    return SamplerOutput(tokens, chosen, top_ids, top_logprobs)
