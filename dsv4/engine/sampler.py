"""Batched token sampling with per-row parameters.

All the math runs on `[N, vocab]` tensors at once; the only per-row Python work is drawing the
random noise of seeded rows from their own generator.

Reproducibility: a seeded request's row at its k-th generated token draws its noise from a
fresh `torch.Generator` seeded with `mix(seed, k)`. The noise therefore depends only on (seed,
k), never on which other rows share the batch or where this row sits in it, and the sampled
token is `argmax(probs / noise)` (exponential-race sampling: equivalent to drawing from
`probs`), a row-wise operation. Same seed, same logits row => same token, whatever the batch.

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
    output_counts: torch.Tensor | None  # [N, V] int32: how often each token was generated
    seen_mask: torch.Tensor | None  # [N, V] bool: token occurs in prompt or output
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
        output_counts = _token_counts(output_ids, vocab_size, device) if need_counts else None
        seen_mask = None
        if need_seen:
            both = [a + b for a, b in zip(prompt_ids, output_ids)]
            seen_mask = _token_counts(both, vocab_size, device) > 0
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
            output_counts=output_counts,
            seen_mask=seen_mask,
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


def _token_counts(ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[N, V] int32 counts, built with one scatter_add over a padded id matrix."""
    n = len(ids)
    width = max((len(x) for x in ids), default=0)
    # Pad with an extra column index `vocab_size` that is dropped afterwards.
    padded = torch.full((n, max(width, 1)), vocab_size, dtype=torch.int64)
    for i, row in enumerate(ids):
        if row:
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    padded = padded.to(device)
    counts = torch.zeros(n, vocab_size + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, frequency, presence penalties and the min_tokens ban. logits: [N, V] fp32."""
    if batch.seen_mask is not None:
        rep = batch.repetition_penalty[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(batch.seen_mask, penalised, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts.to(logits.dtype)
        logits = logits - batch.frequency_penalty[:, None] * counts
        logits = logits - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    if batch.banned_mask is not None:
        logits = logits.masked_fill(batch.banned_mask, _MASK)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask tokens outside each row's top-k, nucleus top-p and min-p sets. [N, V] -> [N, V]."""
    vocab = logits.shape[-1]
    if bool((batch.top_k < vocab).any()) or bool((batch.top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= batch.top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, _MASK)
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token if the mass strictly before it is below top_p (the first always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= batch.top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, _MASK)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if bool((batch.min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, _MASK)
    return logits


def _exponential_noise(batch: SamplingBatch, shape: tuple[int, int], device) -> torch.Tensor:
    """Exp(1) noise [N, V]; seeded rows from their own generator, the rest from the shared one."""
    noise = torch.empty(shape, dtype=torch.float32).exponential_()
    for i, gen in enumerate(batch.generators):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    return noise.to(device)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Pick one token per row. logits: [N, V] (any float dtype); rows follow `batch`."""
    logits = logits.float()
    max_logprobs = max((k for k in batch.num_logprobs if k is not None), default=None)
    raw_logprobs = logits.log_softmax(dim=-1) if max_logprobs is not None else None

    logits = apply_penalties(logits, batch)
    greedy_rows = batch.temperature == 0.0  # [N]
    greedy_tokens = logits.argmax(dim=-1)
    if bool(greedy_rows.all()):
        tokens = greedy_tokens
    else:
        temperature = torch.where(
            greedy_rows, torch.ones_like(batch.temperature), batch.temperature
        )
        scaled = apply_top_k_top_p_min_p(logits / temperature[:, None], batch)
        probs = scaled.softmax(dim=-1)
        noise = _exponential_noise(batch, tuple(probs.shape), probs.device)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(greedy_rows, greedy_tokens, sampled)

    if raw_logprobs is None:
        return SamplerOutput(tokens, None, None, None)
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    top_logprobs, top_ids = (
        raw_logprobs.topk(max_logprobs, dim=-1) if max_logprobs else (None, None)
    )
    return SamplerOutput(tokens, chosen, top_ids, top_logprobs)
