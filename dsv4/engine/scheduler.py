"""Continuous batching: which requests run this step, and how many tokens each.

Policy (FCFS, one step at a time):
1. Running requests, oldest first, decodes before unfinished prefills, each takes
   min(tokens it has left to compute, remaining budget) tokens. Chunks may be any size: the
   runner handles a compressor window that spans chunks through the per-request state slot.
   A decode that has an MTP draft takes it along (two tokens: the last one and the guess of
   the next) when the budget, its blocks and max_tokens allow; a draft never preempts.
2. If a running request cannot get the blocks it needs, the NEWEST running request is
   preempted (blocks and slot freed, `num_computed_tokens` reset, requeued at the front of the
   waiting queue to be recomputed later, generated tokens kept). Oldest requests are protected.
3. Then waiting requests in arrival order are admitted while there is budget, a free state
   slot, blocks for their first chunk, and fewer than `max_num_seqs` running. Admission stops at
   the first request that does not fit (no overtaking), and is skipped in a step that had to
   preempt (the memory is evidently short).

Requests that could never run (prompt + max_tokens over the model's or the cache's limit) are
rejected by `add_request` with a ValueError naming both lengths.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsv4.engine.block_manager import BlockManager
from dsv4.engine.request import Request, RequestStatus, TokenLogprobs


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # known tokens to compute, then the draft tokens
    start_pos: int  # = request.num_computed_tokens when scheduled: position of the first new token
    is_prefill: bool  # more than the single latest token (prompt, or recompute after preemption)
    samples: bool  # the chunk reaches the last known token, so a new token is sampled
    draft_token_ids: list[int] = field(default_factory=list)  # MTP guesses after the last token

    @property
    def token_ids(self) -> list[int]:
        known = self.num_new_tokens - len(self.draft_token_ids)
        return self.request.token_ids_between(self.start_pos, self.start_pos + known) + \
            self.draft_token_ids

    @property
    def num_samples(self) -> int:
        """Logits rows sampled: the last known token's, then one per draft token."""
        return 1 + len(self.draft_token_ids) if self.samples else 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1.")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.cache_capacity_tokens = block_manager.layout.max_tokens_per_seq
        # The longest a sequence may grow: the model's limit or what the cache can hold alone.
        self.max_seq_len = min(max_model_len, self.cache_capacity_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival: running[-1] is the newest
        self.num_preemptions = 0  # total so far, for metrics and tests
        self.num_draft_tokens = 0  # MTP draft tokens verified so far
        self.num_accepted_draft_tokens = 0  # ... and those that matched the sampled token

    # -- requests in and out ---------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.check_fits(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def check_fits(self, request: Request) -> None:
        """Raise ValueError at once if `request` can never run to its end."""
        prompt_len = request.num_prompt_tokens
        max_tokens = request.sampling_params.max_tokens
        need = prompt_len + (max_tokens if max_tokens is not None else 1)
        asked = f"the prompt has {prompt_len} tokens" + (
            f" and max_tokens={max_tokens} (total {need})" if max_tokens is not None else ""
        )
        if need > self.max_model_len:
            raise ValueError(
                f"Request {request.request_id!r} is too long: {asked}, but the model's maximum "
                f"context length (max_model_len) is {self.max_model_len} tokens. Shorten the "
                "prompt or lower max_tokens."
            )
        if need > self.cache_capacity_tokens:
            raise ValueError(
                f"Request {request.request_id!r} is too long: {asked}, but the KV cache holds at "
                f"most {self.cache_capacity_tokens} tokens for one sequence. Shorten the prompt, "
                "lower max_tokens or raise kv_cache_memory_bytes."
            )

    def abort(self, request_id: str) -> Request | None:
        """Finish a request wherever it is and free its cache; None if it is unknown/finished."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.block_manager.free(req)
                    req.status = RequestStatus.FINISHED_ABORTED
                    if req.detokenizer is not None:
                        req.detokenizer.flush()
                    return req
        return None

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return self.num_unfinished > 0

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        by_id: dict[str, ScheduledRequest] = {}
        budget = self.max_num_batched_tokens

        def add(req: Request, n: int) -> None:
            entry = ScheduledRequest(
                request=req,
                num_new_tokens=n,
                start_pos=req.num_computed_tokens,
                is_prefill=req.num_tokens_to_compute > 1,
                samples=req.num_computed_tokens + n == req.num_tokens,
            )
            by_id[req.request_id] = entry
            out.scheduled.append(entry)

        decodes = [r for r in self.running if r.num_tokens_to_compute == 1]
        prefills = [r for r in self.running if r.num_tokens_to_compute > 1]
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens_to_compute, budget)
            total = req.num_computed_tokens + n
            while not self.block_manager.can_grow(req, total):
                victim = self.running[-1]
                budget += self._preempt(victim, by_id, out)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            self.block_manager.grow(req, total)
            add(req, n)
            budget -= n
        # Drafts come after every running request has its blocks: they use what is left and
        # never cause a preemption.
        for entry in out.scheduled:
            draft = self._usable_draft(entry.request, budget)
            total = entry.start_pos + entry.num_new_tokens + len(draft)
            if draft and self.block_manager.can_grow(entry.request, total):
                self.block_manager.grow(entry.request, total)
                entry.num_new_tokens += len(draft)
                entry.draft_token_ids = list(draft)
                budget -= len(draft)

        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.max_num_seqs
        ):
            req = self.waiting[0]
            n = min(req.num_tokens_to_compute, budget)
            if not self.block_manager.can_admit(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            self.block_manager.allocate_slot(req)
            self.block_manager.grow(req, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            self._insert_running(req)
            add(req, n)
            budget -= n
        return out

    def _usable_draft(self, req: Request, budget: int) -> list[int]:
        """The request's MTP draft, if it is decoding and the draft fits the step's budget, the
        sequence limit and what max_tokens leaves (a draft is only worth its cost when the
        token after it may be generated too)."""
        draft = req.draft_token_ids
        if not draft or req.num_tokens_to_compute != 1 or len(draft) > budget:
            return []
        room = self.max_seq_len - req.num_tokens - 1
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - req.num_output_tokens - 1)
        return draft[: max(room, 0)]

    def _insert_running(self, req: Request) -> None:
        i = len(self.running)
        while i > 0 and self.running[i - 1].arrival_index > req.arrival_index:
            i -= 1
        self.running.insert(i, req)

    def _preempt(
        self, victim: Request, by_id: dict[str, ScheduledRequest], out: SchedulerOutput
    ) -> int:
        """Free the victim for recompute; return the budget its scheduled chunk gave back."""
        self.running.remove(victim)
        self.block_manager.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.draft_token_ids = []
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        entry = by_id.pop(victim.request_id, None)
        if entry is None:
            return 0
        out.scheduled.remove(entry)
        return entry.num_new_tokens

    def update_from_output(
        self,
        out: SchedulerOutput,
        sampled: dict[str, list[tuple[int, TokenLogprobs | None]]],
    ) -> list[Request]:
        """Advance the scheduled requests by one step.

        `sampled` maps request_id -> its `num_samples` rows of (token id, logprobs) for every
        entry with `samples` set: the token after the last known one, then the token after each
        draft token. Tokens are taken in order while the draft matches what was sampled: a draft
        token equal to the sampled one was the right input, so its KV stays and the next row is
        valid; at the first mismatch the rest is dropped (its cache rows are simply rewritten by
        the next step, as every row is addressed by position). Returns the requests that got
        new tokens (finished ones included, already freed).
        """
        updated: list[Request] = []
        for entry in out.scheduled:
            req = entry.request
            if req.status is not RequestStatus.RUNNING:  # aborted between schedule and update
                continue
            draft = entry.draft_token_ids
            req.num_computed_tokens += entry.num_new_tokens - len(draft)
            req.draft_token_ids = []
            if not entry.samples:
                continue
            for j, (token_id, logprobs) in enumerate(sampled[req.request_id]):
                req.append_token(token_id, logprobs)
                right = j < len(draft) and token_id == draft[j]
                self.num_accepted_draft_tokens += right
                if req.check_stop(self.max_seq_len) or not right:
                    break
                req.num_computed_tokens += 1
            self.num_draft_tokens += len(draft)
            if req.is_finished:
                self.running.remove(req)
                self.block_manager.free(req)
                if req.detokenizer is not None and req.stop_reason is None:
                    req.detokenizer.flush()
            updated.append(req)
        return updated
