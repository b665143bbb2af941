"""KV compressor: every closed window of `ratio` tokens becomes one KV entry.

score = wgate(x) + ape[position % ratio]; an entry is the per-channel softmax-over-window
weighted sum of wkv(x), then RMSNorm, then RoPE at the window's first position. With
ratio 4 (CSA) windows overlap: wkv/wgate/ape are two halves wide, and entry w pools the
first half (Ca) of window w-1 with the second half (Cb) of window w, 2 * ratio rows.
Computed in float32, as the reference does.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model.cache import CompressorState
from dsv4.model.fusion import fuse_linears
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import apply_rope, rope_cos_sin


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float):
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4
        width = (1 + self.overlap) * head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps)
        self.register_buffer("_kv_gate", None, persistent=False)  # see fuse_projections

    def fuse_projections(self) -> None:
        """For inference: wkv and wgate as one product (`fuse_linears`)."""
        self._kv_gate = fuse_linears(self.wkv, self.wgate)

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """x [..., T, D] at positions [T] -> (kv, score) [..., T, (1 + overlap) * head_dim],
        float32: each token's rows of the windows it falls in."""
        xf = x.float()
        if self._kv_gate is not None:
            kv, score = (xf @ self._kv_gate.float().T).chunk(2, dim=-1)
        else:
            kv, score = xf @ self.wkv.weight.float().T, xf @ self.wgate.weight.float().T
        return kv, score + self.ape.float()[positions % self.ratio]

    def pool_rows(self, kv: torch.Tensor, score: torch.Tensor, valid: torch.Tensor):
        """Entries from the rows of the windows they close, oldest row first: kv and score
        [N, R, (1 + overlap) * head_dim] with R = 2 * ratio (CSA: the previous window's
        rows, then this window's) or ratio; rows not `valid` [N, R] (before position 0) get
        no weight. -> [N, head_dim], normalised, not yet rotated."""
        m, hd = self.ratio, self.head_dim
        if self.overlap:  # the previous window's Ca half, then this window's Cb half
            kv = torch.cat([kv[:, :m, :hd], kv[:, m:, hd:]], dim=1)
            score = torch.cat([score[:, :m, :hd], score[:, m:, hd:]], dim=1)
        score = score.masked_fill(~valid[..., None], float("-inf"))
        return self.norm((kv * torch.softmax(score, dim=1)).sum(dim=1))

    def forward(
        self, x: torch.Tensor, start_pos: int, inv_freq: torch.Tensor, state: CompressorState | None
    ) -> torch.Tensor:
        """x [B, T, D] at positions start_pos.. -> the entries that close in this chunk,
        [B, n_closed, head_dim] float32 (ordered; the first has index ceil-aligned to
        (start_pos - pending) // ratio). Updates `state` in place when given; without a
        state, start_pos must be 0 and trailing tokens of an open window are dropped."""
        m, hd = self.ratio, self.head_dim
        B, T, _ = x.shape
        kv, score = self.project(x, torch.arange(start_pos, start_pos + T, device=x.device))
        first_pos = start_pos
        if state is not None and state.pending_kv is not None:
            kv = torch.cat([state.pending_kv, kv], dim=1)
            score = torch.cat([state.pending_score, score], dim=1)
            first_pos -= state.pending_kv.shape[1]
        n_win = kv.shape[1] // m
        closed = n_win * m
        if state is not None:
            state.pending_kv, state.pending_score = kv[:, closed:], score[:, closed:]
        if n_win == 0:
            return kv.new_zeros(B, 0, hd)
        width = kv.shape[-1]
        win_kv = kv[:, :closed].view(B, n_win, m, width)  # [B, n_win, m, width]
        win_score = score[:, :closed].view(B, n_win, m, width)
        if self.overlap:
            prev_kv = win_kv.new_zeros(B, 1, m, hd)
            prev_score = win_score.new_full((B, 1, m, hd), float("-inf"))
            if state is not None and state.prev_kv is not None:
                prev_kv, prev_score = state.prev_kv[:, None], state.prev_score[:, None]
            ca_kv = torch.cat([prev_kv, win_kv[:, :-1, :, :hd]], dim=1)  # Ca of window w-1
            ca_score = torch.cat([prev_score, win_score[:, :-1, :, :hd]], dim=1)
            slots_kv = torch.cat([ca_kv, win_kv[..., hd:]], dim=2)  # [B, n_win, 2m, hd]
            slots_score = torch.cat([ca_score, win_score[..., hd:]], dim=2)
        else:
            slots_kv, slots_score = win_kv, win_score
        entries = (slots_kv * torch.softmax(slots_score, dim=2)).sum(dim=2)  # [B, n_win, hd]
        entries = self.norm(entries)
        window_starts = first_pos + m * torch.arange(n_win, device=x.device)
        cos, sin = rope_cos_sin(window_starts, inv_freq)
        entries = apply_rope(entries, cos, sin)
        if state is not None and self.overlap:
            state.prev_kv, state.prev_score = win_kv[:, -1, :, :hd], win_score[:, -1, :, :hd]
        return entries
