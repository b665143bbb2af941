"""Mixture of experts: sqrt-softplus router scores, top-k by score + selection bias (or a
fixed token -> experts table in the first `num_hash_layers` layers), a shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.config import ModelArgs
from dsv4.model.fusion import fuse_linears, linear, packed_for_kernels
from dsv4.platforms import cpu_kernels

# A compiled step of up to this many tokens runs the routed experts as fused loops over each
# token's own experts (`MoE._gathered`) rather than products over every expert: a decode step
# of 2, 4 and 8 requests of the benchmark config 1.45x, 1.45x and 1.2x faster on a 2-core CPU
# (with its dense products also fused loops, see the CPU platform's compile options), none
# at 16. A compiled graph traced for at most this many tokens serves only such steps.
GATHERED_MAX_TOKENS = 8
# A compiled step of more tokens lays its routed rows out per expert inside the graph, the
# products running over the busiest expert's count (`MoE._padded`), where E <= this x k: a
# step of more than GATHERED_MAX_TOKENS tokens routes over 2E rows, so an expert rarely gets
# none (the padded products would read its weights for nothing). Past it (the released
# models' 256 or 384 experts, of which a token takes 6), the rows are sorted outside the
# graph (`grouped_experts`).
PADDED_MAX_EXPERTS_PER_SLOT = 4


class Expert(nn.Module):
    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float | None):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.limit = swiglu_limit  # None: no clamp (the reference's shared expert)
        for name in ("_w13", "_w13_packed", "_w2_packed"):  # see fuse_projections
            self.register_buffer(name, None, persistent=False)

    def fuse_projections(self) -> None:
        """For inference: w1 and w3 as one product (`fuse_linears`); both products through
        the CPU kernels where they run (`linear`)."""
        self._w13 = fuse_linears(self.w1, self.w3)
        self._w13_packed = packed_for_kernels(self._w13)
        self._w2_packed = packed_for_kernels(self.w2.weight)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self._w13 is not None:
            gate, up = linear(x, self._w13, self._w13_packed).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        h = F.silu(gate) * up
        if weight is not None:
            h = h * weight[:, None].to(h.dtype)
        return linear(h, self.w2.weight, self._w2_packed)


class Gate(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.topk, self.hashed = args.num_experts_per_tok, hashed
        self.scaling, self.normalize = args.routed_scaling_factor, args.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(args.n_routed_experts, args.hidden_size))
        if hashed:
            self.register_buffer(
                "tid2eid", torch.zeros(args.vocab_size, self.topk, dtype=torch.int32)
            )
        else:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], ids [N] -> (weights [N, k] float32, expert indices [N, k])."""
        scores = torch.sqrt(F.softplus(x.float() @ self.weight.float().T))  # [N, E]
        if self.hashed:
            indices = self.tid2eid[ids].long()
        else:
            indices = (scores + self.bias.float()).topk(self.topk, dim=-1).indices  # bias selects
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        dim, inter = args.hidden_size, args.moe_intermediate_size
        self.gate = Gate(args, hashed)
        self.experts = nn.ModuleList(
            Expert(dim, inter, args.swiglu_limit) for _ in range(args.n_routed_experts)
        )
        self.shared_experts = Expert(dim, inter * args.n_shared_experts, None)
        self._stacked = False  # see stack_experts

    def fuse_projections(self) -> None:
        """For inference: the shared expert's w1 and w3 as one product, and the routed experts
        stacked (`stack_experts`)."""
        self.shared_experts.fuse_projections()
        self.stack_experts()

    def stack_experts(self) -> None:
        """For inference: gather the routed experts' weights into one [E, ...] tensor per
        product, w1 and w3 side by side, which the experts' Linears then view (no extra
        memory). Without gradients the experts then run as two grouped matmuls over the
        tokens sorted by expert, instead of a loop over experts. The parameters share storage
        afterwards, which safetensors refuses to save: the engine calls this, checkpoint code
        does not.

        CPU only: that is where it was measured and tested. On CUDA torch's grouped matmul
        wants bf16 on recent GPUs, unverified here, so the loop stays, as it does with a
        torch that has no `F.grouped_mm`."""
        if not hasattr(F, "grouped_mm") or not self.experts[0].w1.weight.is_cpu:
            return
        w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]).detach() for e in self.experts])
        w2 = torch.stack([e.w2.weight.detach() for e in self.experts])
        inter = w2.shape[2]
        for e, gate_up, down in zip(self.experts, w13, w2):
            e.w1.weight = nn.Parameter(gate_up[:inter], requires_grad=False)
            e.w3.weight = nn.Parameter(gate_up[inter:], requires_grad=False)
            e.w2.weight = nn.Parameter(down, requires_grad=False)
        # [E, in, out]; buffers, so that .to() moves them with the parameters
        self.register_buffer("_w13", w13.transpose(1, 2), persistent=False)
        self.register_buffer("_w2", w2.transpose(1, 2), persistent=False)
        # bf16 on a CPU the kernels serve: a copy of each in their layout, for the padded and
        # sorted products (the routed experts' memory twice over; steps of a few tokens read
        # the stacks above in place)
        packable = cpu_kernels.can_pack(w13) and cpu_kernels.can_pack(w2)
        self.register_buffer("_w13_packed", cpu_kernels.pack_gate_up(w13) if packable else None,
                             persistent=False)
        self.register_buffer("_w2_packed", cpu_kernels.pack(w2) if packable else None,
                             persistent=False)
        self._stacked = True

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x, ids.reshape(-1))
        if not (self._stacked and x.is_cpu and not torch.is_grad_enabled()):
            routed = self._looped(x, weights, indices)
        elif torch.compiler.is_compiling() and len(x) <= GATHERED_MAX_TOKENS:
            routed = self._gathered(x, weights, indices)
        elif torch.compiler.is_compiling() and \
                len(self.experts) <= PADDED_MAX_EXPERTS_PER_SLOT * self.gate.topk:
            routed = self._padded(x, weights, indices)
        else:
            routed = grouped_experts(x, weights, indices, self._w13, self._w2,
                                     self.experts[0].limit, self._w13_packed, self._w2_packed)
        return (routed + self.shared_experts(x)).view(shape)

    def _looped(self, x, weights, indices) -> torch.Tensor:
        out = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
        for e, count in enumerate(counts):  # loop over experts, not over tokens
            if count == 0:
                continue
            token, slot = torch.where(indices == e)
            out.index_add_(0, token, self.experts[e](x[token], weights[token, slot]))
        return out

    def _gathered(self, x, weights, indices) -> torch.Tensor:
        """A compiled step of a few tokens: each token's k experts' rows are read where they
        lie. Written as products and sums over the contiguous input dim, which inductor fuses
        into one loop per matrix that indexes the stacked weights, so no weights are copied
        (eagerly they would be). Each token reads its experts' weights again, so past
        `GATHERED_MAX_TOKENS` the grouped matmuls, which read each expert once, win."""
        w13, w2 = (w.transpose(1, 2)[indices] for w in (self._w13, self._w2))
        gate, up = (x[:, None, None, :] * w13).sum(-1).chunk(2, dim=-1)  # [T, k, inter] each
        limit = self.experts[0].limit
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        h = F.silu(gate) * up * weights[..., None].to(up.dtype)
        return (h[:, :, None, :] * w2).sum(-1).sum(1)  # [T, dim], slots in order

    def _padded(self, x, weights, indices) -> torch.Tensor:
        """A compiled step of more tokens: `grouped_experts`' batched products over rows padded
        to the busiest expert, with the routing traced into the graph (a few fused kernels
        instead of ~20 eager ops a layer). The (token, slot) pair p goes to row `rank` of its
        expert, rank = how many earlier pairs chose that expert (a running count per expert,
        linear in the pairs), so each expert's rows keep token order. Room for every pair at
        every expert: a hash table may list an expert twice for a token."""
        tokens, k = indices.shape
        expert = indices.flatten()
        chose = (expert[:, None] == torch.arange(len(self.experts), device=x.device)).long()
        rank = (chose.cumsum(0) - chose).gather(1, expert[:, None])[:, 0]
        rows, scale = (t.new_zeros(len(self.experts), len(expert), t.shape[1])
                       .index_put_((expert, rank), t)
                       for t in (x.repeat_interleave(k, 0),
                                 weights.flatten()[:, None].to(x.dtype)))
        limit = self.experts[0].limit
        if self._w13_packed is not None and cpu_kernels.enabled:  # a C++ op: no Python
            out = cpu_kernels.padded_experts(rows, scale, chose.sum(0), self._w13_packed,
                                             self._w2_packed, limit)
        else:
            out = padded_experts(rows, scale, chose.sum(0), self._w13, self._w2, limit)
        return out[expert, rank].view(tokens, k, -1).sum(1)  # [T, dim]


# The custom ops' arguments have no defaults: inductor's cache keys a compiled graph by its
# calls as traced, which leave out arguments at their defaults, so a graph compiled before an
# argument was added would be reused and call the op without it (a crash).
@torch.library.custom_op("dsv4::grouped_experts", mutates_args=())
def grouped_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, limit: float | None,
                    w13_packed: torch.Tensor | None, w2_packed: torch.Tensor | None
                    ) -> torch.Tensor:
    """Routed experts over x [N, dim] as matmuls over the tokens sorted by expert; w13
    [E, dim, 2 inter] (w1 then w3) and w2 [E, inter, dim] stacked (`MoE.stack_experts`),
    or their packed copies through `cpu_kernels` where given. The same sums as
    `MoE._looped`, each token's experts added in expert order (bitwise through grouped_mm
    and the kernel, to rounding through the batched product). A custom op, so that a
    compiled graph calls it as it is: the group sizes are data, which `torch.compile` cannot
    trace through, and grouped_mm's tracing rule wants bf16."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # (token, slot) pairs by expert
    token = order // indices.shape[1]
    counts = torch.bincount(flat, minlength=len(w2))
    rows, scale = x[token], weights.flatten()[order, None].to(x.dtype)
    if w13_packed is not None and cpu_kernels.enabled:  # each expert's own rows, in order
        h = cpu_kernels.experts_swiglu(rows, counts, w13_packed, scale, limit)
        out = cpu_kernels.experts_matmul(h, counts, w2_packed)
        return torch.zeros_like(x).index_add_(0, token, out)
    width = int(counts.max())
    padded = width <= SMALL_GROUP and bool(counts.min() > 0)
    if padded:
        # every expert has a few rows (a batch of decode tokens): one batched product over
        # the rows laid out [E, busiest count, ...], zeros after each expert's own, is
        # 1.5x-1.6x faster than grouped_mm's loop of small products for 8 to 64 tokens of
        # the benchmark config alone, 1-2 ms of a ~30 ms 32-request decode step (2-core EPYC);
        # with idle experts it would read their weights too
        expert = flat[order]
        slot = torch.arange(len(flat), device=x.device) - (counts.cumsum(0) - counts)[expert]
        rows, scale = (t.new_zeros(len(w2), width, t.shape[1]).index_put_((expert, slot), t)
                       for t in (rows, scale))
        matmul = torch.bmm
    else:
        ends = counts.cumsum(0).to(torch.int32)

        def matmul(a, w):
            return F.grouped_mm(a, w, offs=ends)
    out = _swiglu(rows, scale, w13, w2, limit, matmul)
    if padded:
        out = out[expert, slot]
    return torch.zeros_like(x).index_add_(0, token, out)


SMALL_GROUP = 64  # rows per expert up to which one batched product beats grouped_mm


def _swiglu(rows, scale, w13, w2, limit: float | None, matmul) -> torch.Tensor:
    """The experts' SwiGLU over their rows, each row times its routing weight before w2; the
    activations in place (four fewer tensors of [rows, inter])."""
    gate, up = matmul(rows, w13).chunk(2, dim=-1)
    if limit is not None:
        gate.clamp_(max=limit), up.clamp_(-limit, limit)
    return matmul(F.silu(gate, inplace=True).mul_(up).mul_(scale), w2)


@torch.library.custom_op("dsv4::padded_experts", mutates_args=())
def padded_experts(rows: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor,
                   w13: torch.Tensor, w2: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Routed experts over rows laid out [E, C, dim] (`MoE._padded`): expert e's counts[e]
    rows first, zeros after; scale [E, C, 1] their routing weights. One batched product per
    matrix over the first max(counts) rows of every expert: that width is data, which a
    compiled graph cannot trace. -> [E, C, dim]; rows past the busiest expert's count are
    left unset, as nothing reads them. (With packed weights `MoE._padded` calls
    `cpu_kernels.padded_experts` instead, which runs each expert's own rows.)"""
    width = int(counts.max())
    out = torch.empty_like(rows)
    out[:, :width] = _swiglu(rows[:, :width], scale[:, :width], w13, w2, limit, torch.bmm)
    return out


@padded_experts.register_fake
def _(rows, scale, counts, w13, w2, limit):
    return torch.empty_like(rows)


@grouped_experts.register_fake
def _(x, weights, indices, w13, w2, limit, w13_packed, w2_packed):
    return torch.empty_like(x)
