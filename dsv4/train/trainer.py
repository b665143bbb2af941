"""Train a small V4-architecture model on the synthetic corpus (how dsv4-tiny is made).

Next-token loss on assistant tokens only, plus the MTP head's loss on the token after next;
Muon for matrices and AdamW for the rest; auxiliary-loss-free load balancing (each scored MoE
layer's selection bias moves towards under-used experts after every step); the hash layers'
token -> experts table fixed at initialisation. Saves in the released layout, FP8 linears and
FP4 experts included, with the tokenizer next to the weights.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv4.chat import Tokenizer, encode_messages
from dsv4.checkpoint.layout import weight_format
from dsv4.checkpoint.writer import write_checkpoint
from dsv4.model.config import ModelArgs
from dsv4.model.moe import Gate
from dsv4.model.transformer import Transformer
from dsv4.train.data import Example, generate_examples
from dsv4.train.muon import Muon, split_parameters
from dsv4.train.tokenizer import save_tokenizer, train_tokenizer


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_tokens: int = 4096  # padded tokens per step: many short examples or a few long ones
    micro_batches: int = 4  # each step sums the gradients of this many runs of similar length,
    # drawn independently, so that one step mixes task families (lengths differ by family)
    lr: float = 0.02  # Muon
    adamw_lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0  # Muon's decoupled decay of the hidden matrices (0.1 did not
    # help dsv4-tiny generalise: README, "Not kept")
    mtp_weight: float = 0.3
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step
    num_examples: int = 200_000  # the pool steps draw from: large enough that a one-hour run
    # sees most examples about once, so it must learn the arithmetic rather than memorise pairs
    time_limit: float | None = None  # seconds of training: the schedule ends at the limit
    vocab_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "micro_batches", "num_examples", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "adamw_lr"):  # NaN fails these comparisons too
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a positive number, got "
                                 f"{getattr(self, name)}")
        for name in ("weight_decay", "mtp_weight", "bias_update_rate"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a number >= 0, got "
                                 f"{getattr(self, name)}")
        if self.time_limit is not None and not 0 < self.time_limit < math.inf:
            raise ValueError(f"TrainConfig.time_limit must be > 0 seconds, got {self.time_limit}")


def render(example: Example, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and a mask of its targets: the assistant turns after
    the last user message (earlier turns are context, rendered as a later prompt shows them,
    without their reasoning)."""
    messages, mode = example.messages, example.thinking_mode
    full = encode_messages(messages, mode)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    ids: list[int] = []
    mask: list[bool] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < last_user:
            continue
        start = len(encode_messages(messages[:i], mode))  # ends with <Assistant><think>|</think>
        end = len(encode_messages(messages[: i + 1], mode))
        if full[:end] != encode_messages(messages[: i + 1], mode):
            raise ValueError("assistant turn renders differently inside the conversation")
        for text, target in ((full[cursor:start], False), (full[start:end], True)):  # noqa: B007
            piece = tokenizer.encode(text) if text else []
            ids += piece
            mask += [target] * len(piece)
        cursor = end
    return ids, mask


def init_weights(model: Transformer, seed: int) -> None:
    """Small random init; norms and hyper-connection scales at 1; tid2eid a fixed, balanced
    random table (hash routing is not learned)."""
    g = torch.Generator().manual_seed(seed)
    args = model.args
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_scale"):
                p.fill_(1.0)
            elif name.endswith(("_base", "attn_sink", ".ape", "gate.bias")):
                p.zero_()
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                k, num_experts = args.num_experts_per_tok, args.n_routed_experts
                rows = [torch.randperm(num_experts, generator=g)[:k]
                        for _ in range(args.vocab_size)]
                buf.copy_(torch.stack(rows).to(buf.dtype))


class _ExpertLoad:
    """Counts, per scored gate, how often each expert was picked in the last forward."""

    def __init__(self, model: Transformer):
        self.counts: dict[Gate, torch.Tensor] = {}
        for module in model.modules():
            if isinstance(module, Gate) and not module.hashed:
                module.register_forward_hook(self._hook)

    def _hook(self, gate: Gate, inputs, output) -> None:
        _, indices = output
        counts = torch.bincount(indices.flatten(), minlength=gate.weight.shape[0]).float()
        self.counts[gate] = self.counts.get(gate, 0) + counts

    @torch.no_grad()
    def rebalance(self, rate: float) -> float:
        """Move each bias towards under-loaded experts; return the worst max/mean load."""
        worst = 1.0
        for gate, counts in self.counts.items():
            mean = counts.mean()
            gate.bias.add_(rate * torch.sign(mean - counts))
            worst = max(worst, float(counts.max() / mean.clamp(min=1)))
        self.counts.clear()
        return worst


def _similar_lengths(data: list, batch_tokens: int, rng: random.Random) -> list:
    """A random run of neighbours in length order (`data` is sorted by length) holding about
    `batch_tokens` padded tokens, so little of each step is spent on padding and a step costs
    about the same whatever the examples' length."""
    start = rng.randrange(len(data))
    end = start + 1
    while end < len(data) and (end + 1 - start) * len(data[end][0]) <= batch_tokens:
        end += 1
    return data[start:end]


def _compact(ids: list[int], mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    # A pool of 200k examples as Python lists would take gigabytes; as tensors, a few hundred MB.
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(mask)


def _batch(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int):
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, (seq, m) in enumerate(examples):
        ids[i, : len(seq)] = seq
        mask[i, : len(m)] = m
    return ids, mask


def losses(model: Transformer, ids: torch.Tensor, mask: torch.Tensor, mtp: bool = True):
    """(next-token loss, MTP loss) averaged over the masked target positions."""
    streams = model.forward_streams(ids)
    logits = model._head(streams, model, model.norm)  # [B, S, V]
    target = mask[:, 1:]
    main = F.cross_entropy(logits[:, :-1][target], ids[:, 1:][target])
    if not mtp or not len(model.mtp) or ids.shape[1] < 3:
        return main, torch.zeros(())
    draft = model.mtp_forward(streams[:, :-2], ids[:, 1:-1])  # predicts t + 2
    target2 = mask[:, 2:]
    return main, F.cross_entropy(draft[target2], ids[:, 2:][target2])


def _step(model: Transformer, optimizers, data: list, cfg: TrainConfig, rng: random.Random,
          pad_id: int, device: str) -> tuple[float, float, int]:
    """One optimizer step over `cfg.micro_batches` runs of similar length (gradients summed);
    -> (next-token loss, MTP loss, padded tokens seen)."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    main = mtp = 0.0
    tokens = 0
    for _ in range(cfg.micro_batches):
        run = _similar_lengths(data, cfg.batch_tokens // cfg.micro_batches, rng)
        ids, mask = (t.to(device) for t in _batch(run, pad_id))
        part_main, part_mtp = losses(model, ids, mask)
        ((part_main + cfg.mtp_weight * part_mtp) / cfg.micro_batches).backward()
        main += part_main.item() / cfg.micro_batches
        mtp += part_mtp.item() / cfg.micro_batches
        tokens += int(ids.numel())
    for opt in optimizers:
        opt.step()
    return main, mtp, tokens


def train(args: ModelArgs, cfg: TrainConfig, out_dir: str | Path | None = None,
          device: str = "cpu", progress: bool = True, bf16_dir: str | Path | None = None) -> dict:
    """Train from scratch; returns the loss history. Writes the model (FP8 + FP4) when out_dir
    is given, and the bf16 weights it was quantised from when bf16_dir is."""
    torch.manual_seed(cfg.seed)
    examples = list(generate_examples(cfg.num_examples, seed=cfg.seed))
    texts = [encode_messages(e.messages, e.thinking_mode) for e in examples[:5000]]
    tokenizer = Tokenizer(train_tokenizer(texts, cfg.vocab_size))
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} entries but the model's "
                         f"vocab_size is {args.vocab_size}; raise vocab_size in the config")
    data = sorted((_compact(*render(e, tokenizer)) for e in examples), key=lambda d: len(d[0]))
    del examples
    model = Transformer(args).to(device)
    init_weights(model, cfg.seed)
    model.train()
    matrices, rest = split_parameters(model)
    muon = Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay)
    adamw = torch.optim.AdamW(rest, lr=cfg.adamw_lr, betas=(0.9, 0.95), weight_decay=0.0)
    load = _ExpertLoad(model)
    rng = random.Random(cfg.seed)
    history = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="train", unit="step")
    start = time.perf_counter()
    tokens = 0
    try:
        for step in range(cfg.steps):
            progress = step / cfg.steps
            if cfg.time_limit is not None:
                progress = max(progress, (time.perf_counter() - start) / cfg.time_limit)
                if progress >= 1.0:
                    break
            scale = max(0.05, min(1.0, (step + 1) / cfg.warmup_steps) *
                        0.5 * (1 + math.cos(math.pi * progress)))  # warmup, cosine decay
            for opt, base in ((muon, cfg.lr), (adamw, cfg.adamw_lr)):
                for group in opt.param_groups:
                    group["lr"] = base * scale
            main, mtp, step_tokens = _step(model, (muon, adamw), data, cfg, rng,
                                           tokenizer.eos_id, device)
            tokens += step_tokens
            imbalance = load.rebalance(cfg.bias_update_rate)
            history.append({"step": step, "loss": main, "mtp_loss": mtp,
                            "max_expert_load": imbalance, "lr_scale": scale,
                            "seconds": round(time.perf_counter() - start, 2)})
            if bar is not None:
                rate = tokens / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{main:.3f}", mtp=f"{mtp:.3f}",
                                tok_s=f"{rate:.0f}")
                bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C: keep (and save) the model trained so far
        print(f"interrupted after {len(history)} of {cfg.steps} steps; saving what was trained")
    if bar is not None:
        bar.close()
    model.eval()
    if out_dir is not None:
        save(model, tokenizer, out_dir)
    if bf16_dir is not None:
        save(model, tokenizer, bf16_dir, quantize="bf16")
    return {"history": history, "model": model, "tokenizer": tokenizer, "tokens": tokens,
            "seconds": time.perf_counter() - start}


def save(model: Transformer, tokenizer: Tokenizer, out_dir: str | Path,
         quantize: str = "fp8") -> Path:
    """The released layout: config.json, tokenizer.json and the weights, FP8 linears + FP4
    experts (quantize="fp8"), those same tensors in bf16 (quantize="bf16": what the FP8 + FP4
    files were quantised from, to measure what quantisation costs) or as trained ("none")."""
    if quantize not in ("fp8", "bf16", "none"):
        raise ValueError(f"quantize must be 'fp8', 'bf16' or 'none', got {quantize!r}")
    out = Path(out_dir)
    config = model.args.to_dict()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if quantize == "fp8":
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8", "scale_fmt": "ue8m0",
                                         "weight_block_size": [128, 128]}
        config["expert_dtype"] = "fp4"
    elif quantize == "bf16":
        state = {k: v.to(torch.bfloat16) if weight_format(k) in ("fp8", "fp4") else v
                 for k, v in state.items()}
    write_checkpoint(state, out, config=config, quantize="fp8" if quantize == "fp8" else "none")
    save_tokenizer(tokenizer.backend, out)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id}))
    return out
