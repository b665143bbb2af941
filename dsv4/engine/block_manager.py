"""Bookkeeping of the hybrid cache pools: free lists of state slots and blocks.

Pure Python: the tensors themselves live with the runner (see kv_cache.py for the layout). A
running request owns one state slot and the blocks of the tokens it has computed (plus, after a
rejected MTP draft, possibly the block of the next token, which it will need anyway). No
prefix sharing, so no reference counts: a block has exactly one owner or is free.
"""

from __future__ import annotations

from collections import deque

from dsv4.engine.kv_cache import KVCacheLayout
from dsv4.engine.request import Request


class BlockManager:
    def __init__(self, layout: KVCacheLayout) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self._free_blocks: deque[int] = deque(range(layout.num_blocks))
        self._free_slots: deque[int] = deque(range(layout.num_state_slots))
        self._block_owner: dict[int, str] = {}
        self._slot_owner: dict[int, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (what a /metrics gauge reports)."""
        return 1.0 - self.num_free_blocks / max(1, self.layout.num_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return self.layout.blocks_needed(num_tokens)

    def num_new_blocks(self, request: Request, num_total_tokens: int) -> int:
        """Blocks `request` must gain so its cache covers `num_total_tokens` tokens."""
        return max(0, self.blocks_needed(num_total_tokens) - len(request.block_table))

    def can_admit(self, request: Request, num_total_tokens: int) -> bool:
        """A waiting request needs a state slot and blocks for its first chunk."""
        return (
            self.num_free_slots > 0
            and self.num_new_blocks(request, num_total_tokens) <= self.num_free_blocks
        )

    def can_grow(self, request: Request, num_total_tokens: int) -> bool:
        return self.num_new_blocks(request, num_total_tokens) <= self.num_free_blocks

    def allocate_slot(self, request: Request) -> int:
        if request.state_slot is not None:
            raise RuntimeError(f"request {request.request_id} already holds a state slot")
        if not self._free_slots:
            raise RuntimeError("no free state slot; check can_admit() first")
        slot = self._free_slots.popleft()
        self._slot_owner[slot] = request.request_id
        request.state_slot = slot
        return slot

    def grow(self, request: Request, num_total_tokens: int) -> list[int]:
        """Append blocks so the request's table covers `num_total_tokens`; return the new ones."""
        need = self.num_new_blocks(request, num_total_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(
                f"request {request.request_id} needs {need} blocks, {self.num_free_blocks} free; "
                "check can_grow() first"
            )
        new = [self._free_blocks.popleft() for _ in range(need)]
        for b in new:
            self._block_owner[b] = request.request_id
        request.block_table.extend(new)
        return new

    def free(self, request: Request) -> None:
        """Return the request's slot and blocks. Safe to call twice: the second call finds
        nothing to return. A block or slot owned by another request is never released."""
        for b in request.block_table:
            if self._block_owner.get(b) != request.request_id:
                raise RuntimeError(f"block {b} is not owned by request {request.request_id}")
            del self._block_owner[b]
            self._free_blocks.append(b)
        request.block_table = []
        if request.state_slot is not None:
            slot = request.state_slot
            if self._slot_owner.get(slot) != request.request_id:
                raise RuntimeError(f"slot {slot} is not owned by request {request.request_id}")
            del self._slot_owner[slot]
            self._free_slots.append(slot)
            request.state_slot = None
