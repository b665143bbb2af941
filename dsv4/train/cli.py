"""`dsv4 train`: train a small V4-architecture model on the synthetic corpus.

    dsv4 train --out dsv4/assets/dsv4-tiny            # the bundled model's architecture
    dsv4 train --config my_config.json --steps 500 --out /tmp/m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsv4.model.config import ModelArgs
from dsv4.train.trainer import TrainConfig, train

# dsv4-tiny: every V4 component at toy width. Window and ratios as released (128 / 4 / 128),
# a hash-routed and a score-routed MoE layer, the MTP layer; dims that fit the FP8 (64) and
# FP4 (32) blocks so the saved model uses the released FP8 + FP4 formats.
TINY_CONFIG = dict(
    vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
    head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=256,
    routed_scaling_factor=1.5, index_n_heads=4, index_head_dim=64, index_topk=16,
    sliding_window=128, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1,
    num_nextn_predict_layers=1, max_position_embeddings=65536,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                  "beta_fast": 32, "beta_slow": 1},
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="'tiny' or a V4 config.json path")
    parser.add_argument("--out", required=True, help="folder to write the model to")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-tokens", type=int, default=TrainConfig.batch_tokens,
                        help="padded tokens per step (examples of similar length are batched)")
    parser.add_argument("--micro-batches", type=int, default=TrainConfig.micro_batches,
                        help="runs of similar length summed into each step (mixes task families)")
    parser.add_argument("--num-examples", type=int, default=TrainConfig.num_examples)
    parser.add_argument("--vocab-size", type=int, default=TrainConfig.vocab_size,
                        help="BPE entries to train (at most the config's vocab_size)")
    parser.add_argument("--bf16-out", default=None,
                        help="also write the bf16 weights the FP8 + FP4 model is quantised from")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds to train for: the learning-rate schedule ends there "
                             "(or at --steps, whichever comes first)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="Muon learning rate")
    parser.add_argument("--adamw-lr", type=float, default=TrainConfig.adamw_lr,
                        help="AdamW learning rate (embeddings, norms, biases)")
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                        help="decoupled weight decay of the Muon (hidden) matrices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def _writable_folder(path: str, option: str) -> None:
    """Fail before training, not after it, when the model could not be saved."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".dsv4-write-test").touch()
        (folder / ".dsv4-write-test").unlink()
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot write there ({exc.strerror or exc}); "
                         "pick a folder you can write to") from None


def run(args: argparse.Namespace) -> int:
    from dsv4.platforms import get_platform

    model_args = ModelArgs(**TINY_CONFIG) if args.config == "tiny" else \
        ModelArgs.from_json(args.config)
    get_platform(args.device)  # an unknown or absent device fails now, not after the data
    _writable_folder(args.out, "--out")
    if args.bf16_out is not None:
        _writable_folder(args.bf16_out, "--bf16-out")
    cfg = TrainConfig(steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr,
                      micro_batches=args.micro_batches,
                      adamw_lr=args.adamw_lr, num_examples=args.num_examples,
                      vocab_size=args.vocab_size, seed=args.seed,
                      time_limit=args.time_limit, weight_decay=args.weight_decay)
    result = train(model_args, cfg, out_dir=args.out, device=args.device,
                   bf16_dir=args.bf16_out)
    # The loss curve next to the weights: what tells a good draw of a recipe from a poor one.
    with open(Path(args.out) / "train_log.jsonl", "w") as log:
        log.writelines(json.dumps(h) + "\n" for h in result["history"])
    last = result["history"][-20:] or [{"loss": float("nan"), "mtp_loss": float("nan")}]
    summary = {"steps": len(result["history"]), "out": args.out,
               "train_seconds": round(result["seconds"], 1),
               "tokens_per_second": round(result["tokens"] / result["seconds"]),
               "final_loss": sum(h["loss"] for h in last) / len(last),
               "final_mtp_loss": sum(h["mtp_loss"] for h in last) / len(last)}
    print(json.dumps(summary))
    return 0
