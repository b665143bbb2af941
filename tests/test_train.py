from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.chat import Tokenizer, encode_messages
from dsv4.model.config import ModelArgs
from dsv4.train import data
from dsv4.train.trainer import TrainConfig, render, save, train

TINY = dict(vocab_size=1280, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
            head_dim=80, qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=32,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            index_n_heads=2, index_head_dim=32, index_topk=8, sliding_window=128,
            compress_ratios=[4, 128, 0, 0], num_hash_layers=1, max_position_embeddings=4096)


def test_render_masks_exactly_the_assistant_turns():
    from dsv4.train.tokenizer import train_tokenizer

    examples = list(data.generate_examples(300, seed=0))
    tok = Tokenizer(train_tokenizer([encode_messages(e.messages, e.thinking_mode)
                                     for e in examples], 800))
    tool = next(e for e in examples if e.family == "tool" and e.thinking_mode == "thinking")
    ids, mask = render(tool, tok)
    assert tok.decode(ids) == encode_messages(tool.messages, tool.thinking_mode)
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    # both assistant turns (the call and the final answer), each ending with EOS
    assert target.count("<｜end▁of▁sentence｜>") == 2
    assert "<｜DSML｜invoke" in target and tool.expected["final"] in target
    assert "<｜User｜>" not in target and "<tool_result>" not in target


def test_training_lowers_the_loss_and_the_checkpoint_loads_back_bit_exactly(tmp_path):
    args = ModelArgs(**TINY)
    cfg = TrainConfig(steps=30, batch_tokens=600, num_examples=200, vocab_size=1200,
                      warmup_steps=5)
    result = train(args, cfg, progress=False)
    losses = [h["loss"] for h in result["history"]]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(h["mtp_loss"] > 0 for h in result["history"])
    model = result["model"]
    save(model, result["tokenizer"], tmp_path / "plain", quantize="none")
    loaded = dsv4.load_model(tmp_path / "plain", device="cpu", dtype=torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    save(model, result["tokenizer"], tmp_path / "fp8")
    quantized = dsv4.load_model(tmp_path / "fp8", device="cpu", dtype=torch.float32)
    assert quantized.kv_fp8 and quantized.indexer_fp4  # what a quantised release runs with
    assert Tokenizer.from_folder(tmp_path / "fp8").vocab_size == result["tokenizer"].vocab_size


def test_train_command_writes_the_loss_curve_next_to_the_model(tmp_path, capsys):
    import json

    from dsv4.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "m"), "--steps", "3",
                 "--batch-tokens", "300", "--num-examples", "50", "--vocab-size", "1200"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text()
           .splitlines()]
    assert [h["step"] for h in log] == [0, 1, 2] and summary["steps"] == 3
    assert all(h["loss"] > 0 and 0 < h["lr_scale"] <= 1 for h in log)
    assert log[0]["seconds"] <= log[1]["seconds"] <= log[2]["seconds"]
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_eval_scores_every_task_on_the_held_out_split(tmp_path, capsys):
    from dsv4.train.evaluate import evaluate

    args = ModelArgs(**TINY)
    result = train(args, TrainConfig(steps=2, batch_tokens=300, num_examples=50, vocab_size=1200),
                   progress=False)
    save(result["model"], result["tokenizer"], tmp_path)
    scores = evaluate(tmp_path, num_examples=12, max_tokens=6, misses=True)
    for key in ("arithmetic_accuracy", "tool_call_accuracy", "final_answer_accuracy",
                "mtp_acceptance"):
        assert 0.0 <= scores[key] <= 1.0, key
    assert scores["num_examples"] == 12
    # the breakdown splits every generation (two per tool example) by score, mode and task
    from dsv4.train.data import eval_examples

    asked = sum(1 + (e.family == "tool") for e in eval_examples(12))
    assert sum(int(v.split("/")[1]) for v in scores["breakdown"].values()) == asked
    for key in scores["breakdown"]:
        score, mode, task = key.split("/")
        assert f"{score}_accuracy" in scores and mode in ("chat", "thinking") and task
    # every wrong generation is listed once, under its breakdown key, with the question asked
    right = sum(int(v.split("/")[0]) for v in scores["breakdown"].values())
    assert len(scores["misses"]) == asked - right
    questions = {m["content"] for e in eval_examples(12) for m in e.messages
                 if m["role"] == "user"}
    for miss in scores["misses"]:
        assert miss["task"] in scores["breakdown"] and miss["question"] in questions
        assert miss["expected"] not in (None, "") and isinstance(miss["output"], str)
    from dsv4.cli import main

    assert main(["eval", "--model", str(tmp_path), "--num-examples", "3", "--misses"]) == 0
    printed = capsys.readouterr().out
    table, *blocks = printed.split("\nmissed ")
    counts = [line.split()[-1].split("/") for line in table.splitlines()
              if line.startswith("  ")]  # "  arithmetic/chat/+   0/1"
    missed = sum(int(n) - int(r) for r, n in counts)
    assert len(blocks) == missed > 0 and all("expected" in b and "output" in b for b in blocks)


def test_time_limit_ends_the_schedule():
    args = ModelArgs(**TINY)
    result = train(args, TrainConfig(steps=10**6, batch_tokens=300, num_examples=50,
                                      vocab_size=1200, time_limit=2.0), progress=False)
    assert 1 <= len(result["history"]) < 10**6
    assert result["seconds"] < 2.0 + 5.0  # the step running at the limit finishes


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("weight_decay", -0.1), ("time_limit", 0),
    ("lr", float("nan")), ("adamw_lr", float("inf")), ("weight_decay", float("nan")),
])  # lr=nan trained a model of NaN weights and exited 0
def test_bad_training_settings_are_refused_before_any_work(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("flags, says", [
    (["--out", "/proc/dsv4-nope"], "--out /proc/dsv4-nope: cannot write"),
    (["--out", "{tmp}/m", "--bf16-out", "/proc/dsv4-nope"], "--bf16-out"),
    (["--out", "{tmp}/m", "--device", "tpu"], "unknown device 'tpu'"),
    (["--out", "{tmp}/m", "--config", "{tmp}/missing.json"], "no config.json at"),
])
def test_train_command_fails_before_training_when_it_could_not_finish(tmp_path, capsys, flags,
                                                                      says):
    from dsv4.cli import main

    flags = [f.format(tmp=tmp_path) for f in flags]
    assert main(["train", *flags, "--steps", "1", "--num-examples", "20000"]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_eval_command_refuses_what_it_cannot_measure(tmp_path, capsys):
    from dsv4.cli import main

    assert main(["eval", "--num-examples", "0"]) == 2  # scored nothing and exited 0
    assert "--num-examples must be at least 1" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
