"""The seam between the engine and the model: what a model runner must do.

The engine (scheduler, sampler, detokenizer) never looks inside the model. Each step it hands
the runner a `RaggedBatch` and gets back one row of logits per request that samples.
"""

from __future__ import annotations

import abc

import torch

from dsv4.engine.batch import RaggedBatch
from dsv4.engine.kv_cache import KVCacheLayout


class ModelRunner(abc.ABC):
    """Runs one forward step of the model over a ragged batch, with the paged hybrid cache.

    Contract for implementations (the paged V4 runner follows it; so may a test runner):

    * The runner owns the cache tensors, `layout.allocate(device)` on its platform's device,
      and is the only one that reads or writes them.
    * `execute_model(batch)` computes the model on `batch.input_ids` at `batch.positions`,
      request i owning tokens `query_start_loc[i]:query_start_loc[i+1]` and having
      `start_pos[i]` earlier tokens already in the cache. For each layer it must
        - attend, for token t, to the window positions max(0, t-window+1)..t: those before
          start_pos from the window ring of `state_slots[i]`, the rest from this step's fresh KV
          (so a chunk longer than the window never reads a ring row it has overwritten);
        - attend to compressed entries w < (t + 1) // m of its layer, found via `block_tables`
          (CSA: top-k of them by the indexer; HCA: all);
        - write the new window KV at `window_slot_mapping`, new compressed entries and indexer
          keys at `compressed_slot_mapping[m]`, and the compressor's input rows into the
          state slot's rings. Ring rows are only read for positions in
          [start_pos - R, start_pos), so a reused slot (new request, or recompute after a
          preemption) never sees its previous owner's rows and needs no clearing.
    * It returns fp32 logits `[len(batch.logits_indices), vocab_size]`, in that order.
    * Tokens may be guesses (MTP drafts) that the engine later rejects: the request's next step
      then starts at that position again. As every row above is addressed by position and a
      step writes before it reads, the rejected rows are simply overwritten; no rollback.
    * No Python loop over requests inside layers: per-request structure comes in as tensors.

    Wiring recipe for the V4 runner, as tests/engine_v4_oracle.py does it over transformers'
    weights (per layer l with ratio m; pools from
    `layout.allocate(device)`, names as in `KVCacheLayout.pool_shapes`; ops in paged_ops.py):

    1. kv = model's kv path on all T tokens            -> [T, 512]
       win, win_ok = ring_context(pools[f"{l}.window_kv"], kv, batch)   # [T, W, 512], [T, W]
       write_ring(pools[f"{l}.window_kv"], kv, batch)
    2. if m: kv_c, score = compressor inputs            -> [T, (1 + overlap) * 512] each
       close = batch.compressed_slot_mapping[m] >= 0; idx = close.nonzero()[:, 0]
       rows, ok = ring_context(pools[f"{l}.compressor_kv"], kv_c, batch, idx)    # [E, 2m or m, .]
       (same for score; invalid rows get weight 0), entries = model's pooling -> [E, 512],
       RoPE'd at each window's first position (closing position - m + 1)
       write_ring(...compressor_kv / compressor_score...)
       write_compressed(pools[f"{l}.compressed_kv"], batch.compressed_slot_mapping[m], entries)
       comp, comp_ok = gather_compressed(pools[f"{l}.compressed_kv"], batch, m, block_size)
       visible = compressed_visibility(batch, m, comp.shape[1]) & comp_ok[batch.seq_index]
    3. if m == 4: the same with index_compressor_* and index_keys (on every step, even before
       the first entry exists: the ring must see every token), then the model's indexer scores
       queries against index keys (masked by `visible`) and keeps the top-k entries; break
       score ties by entry index, so the choice does not depend on the batch's entry width.
    4. attention of each token over [win (masked by win_ok), its request's selected entries]
       with the sink; comp is per request: index it with `batch.seq_index`.

    The V4 runner (model_runner.py) reads the window more cheaply than step 1 says: prefill
    chunks attend in `query_blocks` of 64 tokens that share one `window_band` of 64 + W - 1
    rows, so a cached row is gathered about twice rather than W times; decodes attend token by
    token (blocks of one). The math is the same.
    """

    vocab_size: int
    eos_token_id: int | None
    layout: KVCacheLayout
    num_speculative_tokens: int = 0  # draft tokens per decode step (propose_drafts)

    @abc.abstractmethod
    def execute_model(self, batch: RaggedBatch) -> torch.Tensor:
        """Forward one ragged step; return logits [S, vocab] of the sampled positions."""

    def propose_drafts(self, batch: RaggedBatch, stream_rows: torch.Tensor) -> torch.Tensor:
        """Runners with `num_speculative_tokens` > 0: draft token ids [S] for the next step.

        Called after `execute_model` with `build_draft_batch`'s batch: its token t is the
        drafter's input at position p, the known token at p + 1, paired with row
        `stream_rows[t]` of the tokens of that last `execute_model` (position p). The drafter
        keeps its own cache for these positions (the V4 runner: the MTP layer's window ring).
        """
        raise NotImplementedError(f"{type(self).__name__} does not draft tokens")
