"""The ragged batch one engine step hands to a model runner.

Tokens of all scheduled requests are concatenated (request after request, no padding), the
layout of vLLM's varlen attention: request i owns tokens `query_start_loc[i]:query_start_loc[i+1]`.
Prefill chunks and decodes are mixed freely; a decode is simply a chunk of one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from dsv4.engine.kv_cache import KVCacheLayout, compressed_slot_mapping, window_slot_mapping
from dsv4.engine.request import Request
from dsv4.engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class RaggedBatch:
    """Everything a runner needs for one forward step over the scheduled requests.

    Per token (T = total new tokens): input_ids, positions, seq_index, window_slot_mapping,
    compressed_slot_mapping[ratio] (-1 where the token closes no compressed entry).
    Per request (B = scheduled requests): query_start_loc [B+1], start_pos (tokens already in
    the cache; 0 means the compressor state must start empty), seq_lens (context after this
    step), state_slots, block_tables [B, max_blocks] (-1 padded).
    logits_indices [S]: the tokens whose logits are sampled, `num_samples` per request (its
    last known token, then its draft tokens), in `scheduled` order.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    seq_index: torch.Tensor  # [T] int64, which of the B requests the token belongs to
    query_start_loc: torch.Tensor  # [B + 1] int64
    start_pos: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int64
    state_slots: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, max_blocks] int64
    window_slot_mapping: torch.Tensor  # [T] int64
    compressed_slot_mapping: dict[int, torch.Tensor]  # ratio -> [T] int64
    logits_indices: torch.Tensor  # [S] int64
    scheduled: list[ScheduledRequest]
    num_closing: dict[int, int]  # ratio -> tokens that close an entry (a host int: no sync)
    # Index tensors derived from the fields above, computed by the first layer that needs them
    # and reused by the others (see `per_step`); never moved by `to`.
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def sampling_requests(self) -> list[ScheduledRequest]:
        return [s for s in self.scheduled if s.samples]

    def per_step(self, key: tuple, make):
        """make() computed once for this batch: the index math (rows, masks, positions) that
        depends only on the batch, which every layer of a step would otherwise redo. `key`
        names what make() computes and every argument it depends on besides the batch."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def to(self, device: torch.device | str) -> RaggedBatch:
        moved = {}
        for f in fields(self):
            if f.name == "memo":
                continue
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
            elif f.name == "compressed_slot_mapping":
                v = {m: t.to(device, non_blocking=True) for m, t in v.items()}
            moved[f.name] = v
        return RaggedBatch(**moved)


def build_batch(out: SchedulerOutput, layout: KVCacheLayout) -> RaggedBatch:
    """Flatten a SchedulerOutput into CPU tensors (the runner moves them to its device)."""
    scheduled = out.scheduled
    if not scheduled:
        raise ValueError("build_batch needs at least one scheduled request")
    ids: list[int] = []
    for s in scheduled:
        chunk = s.token_ids
        assert len(chunk) == s.num_new_tokens, "scheduled more tokens than the request has"
        ids.extend(chunk)
    tables = [s.request.block_table for s in scheduled]
    width = max(1, max(len(t) for t in tables))
    # one tensor from padded lists: a copy into a row per request took 10x as long (116 vs
    # 11 us for 32 requests), a tenth of a 32-request decode step's work outside the model
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables],
                                dtype=torch.int64)
    return _ragged(
        ids,
        num_new=[s.num_new_tokens for s in scheduled],
        start_pos=[s.start_pos for s in scheduled],
        state_slots=[s.request.state_slot for s in scheduled],
        num_logits=[s.num_samples for s in scheduled],
        block_tables=block_tables,
        ratios=sorted({m for m in layout.spec.compress_ratios if m}),
        layout=layout,
        scheduled=list(scheduled),
    )


def build_draft_batch(
    spans: list[tuple[Request, int, int]], layout: KVCacheLayout
) -> tuple[RaggedBatch, list[Request]]:
    """The MTP layer's step after a main step. `spans` holds (request, first position, count)
    of the positions whose next token is now known: the MTP input at position p is the main
    model's final streams at p and the token at p + 1. Logits are taken at the last position of
    each request that decodes next (it gets a new draft); those requests are returned in
    logits order. The MTP layer has a window only, so no blocks or compressed slots."""
    ids: list[int] = []
    for req, start, count in spans:
        ids += req.token_ids_between(start + 1, start + 1 + count)
    decodes_next = [req.num_tokens_to_compute == 1 for req, _, _ in spans]
    batch = _ragged(
        ids,
        num_new=[count for _, _, count in spans],
        start_pos=[start for _, start, _ in spans],
        state_slots=[req.state_slot for req, _, _ in spans],
        num_logits=[int(d) for d in decodes_next],
        block_tables=torch.full((len(spans), 1), -1, dtype=torch.int64),
        ratios=[],
        layout=layout,
        scheduled=[],
    )
    return batch, [req for (req, _, _), d in zip(spans, decodes_next) if d]


def _ragged(ids: list[int], *, num_new: list[int], start_pos: list[int], state_slots: list[int],
            num_logits: list[int], block_tables: torch.Tensor, ratios: list[int],
            layout: KVCacheLayout, scheduled: list[ScheduledRequest]) -> RaggedBatch:
    """The batch of requests whose new tokens `ids` are concatenated, request i owning
    num_new[i] of them from position start_pos[i]; logits at the last num_logits[i]."""
    num_new_t = torch.tensor(num_new, dtype=torch.int64)  # [B]
    start = torch.tensor(start_pos, dtype=torch.int64)  # [B]
    query_start_loc = torch.zeros(len(num_new) + 1, dtype=torch.int64)
    query_start_loc[1:] = num_new_t.cumsum(0)
    seq_index = torch.repeat_interleave(torch.arange(len(num_new)), num_new_t)  # [T]
    positions = start[seq_index] + (torch.arange(len(ids)) - query_start_loc[:-1][seq_index])
    slots = torch.tensor(state_slots, dtype=torch.int64)
    ends = query_start_loc[1:].tolist()
    logits_rows = [t for n, end in zip(num_logits, ends) for t in range(end - n, end)]
    compressed = {
        m: compressed_slot_mapping(block_tables, seq_index, positions, m, layout.block_size)
        for m in ratios
    }
    return RaggedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=positions,
        seq_index=seq_index,
        query_start_loc=query_start_loc,
        start_pos=start,
        seq_lens=start + num_new_t,
        state_slots=slots,
        block_tables=block_tables,
        window_slot_mapping=window_slot_mapping(
            slots[seq_index], positions, layout.spec.sliding_window
        ),
        compressed_slot_mapping=compressed,
        logits_indices=torch.tensor(logits_rows, dtype=torch.int64),
        scheduled=scheduled,
        num_closing={m: int((rows >= 0).sum()) for m, rows in compressed.items()},
    )
