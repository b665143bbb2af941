"""The bundled dsv4-tiny: stored as the release is (FP8 linears, FP4 experts), small enough to
ship, and loaded through the engine it answers what it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from dsv4.chat import Tokenizer, encode_messages, parse_completion
from dsv4.engine.llm import LLM
from dsv4.engine.sampling_params import SamplingParams
from dsv4.train.data import CAPABILITIES, eval_examples
from dsv4.train.evaluate import BUNDLED, evaluate


def test_bundled_files_are_fp8_and_fp4_and_under_30_mb():
    size = sum(p.stat().st_size for p in Path(BUNDLED).iterdir())
    assert size < 30 * 2**20, size
    with safe_open(str(BUNDLED / "model.safetensors"), "pt") as f:
        def kind(name):
            return f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()

        # FP8 e4m3 linear with UE8M0 block scales
        assert kind("layers.0.attn.wq_a.weight") == ("F8_E4M3", [128, 256])
        assert kind("layers.0.attn.wq_a.scale")[0] == "F8_E8M0"
        # FP4 e2m1 expert: two values per int8 byte, one UE8M0 scale per 32 values
        assert kind("layers.1.ffn.experts.0.w1.weight") == ("I8", [256, 128])
        assert kind("layers.1.ffn.experts.0.w1.scale") == ("F8_E8M0", [256, 8])


def test_bundled_model_answers_through_the_engine():
    tok = Tokenizer.from_folder(BUNDLED)
    llm = LLM(model=str(BUNDLED), device="cpu", dtype="fp32", max_num_seqs=4, tokenizer=tok)
    # held-out tool questions (never trained on) whose arguments must be copied from the
    # question: a broken loader, dequantiser or cache would show here
    held_out = eval_examples(200)
    tool_uses = [next(e for e in held_out if e.family == "tool" and e.expected["tool"] == name)
                 for name in ("calculator", "get_weather")]
    prompts = [encode_messages([{"role": "user", "content": "What can you do?"}], "chat")]
    prompts += [encode_messages(e.messages[:2], e.thinking_mode) for e in tool_uses]
    params = SamplingParams(temperature=0, max_tokens=120)
    reply, *calls = llm.generate([tok.encode(p) for p in prompts], params)
    assert parse_completion(tok.decode(reply.token_ids), "chat")["content"] == CAPABILITIES
    for out, e in zip(calls, tool_uses):
        message = parse_completion(tok.decode(out.token_ids), e.thinking_mode)
        [tool_call] = message["tool_calls"]
        assert tool_call["function"]["name"] == e.expected["tool"]
        assert json.loads(tool_call["function"]["arguments"]) == e.expected["arguments"]


def test_transformers_with_the_bundled_weights_writes_what_dsv4_writes():
    """transformers' DeepseekV4 (written by nobody here) loaded with dsv4-tiny's dequantised
    weights generates the same greedy reasoning as dsv4's engine does."""
    import torch
    from v4_oracle import hf_model_from

    tok = Tokenizer.from_folder(BUNDLED)
    question = next(e for e in eval_examples(40)
                    if e.family == "arithmetic" and e.thinking_mode == "thinking")
    prompt = tok.encode(encode_messages(question.messages[:-1], "thinking"))
    llm = LLM(model=str(BUNDLED), device="cpu", dtype="fp32", max_num_seqs=1, tokenizer=tok)
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=48))[0].token_ids
    hf = hf_model_from(llm.engine.runner.model)
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                             eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    assert theirs[0, len(prompt):].tolist() == ours
    reference = question.messages[-1]["reasoning_content"]  # the same method, at least
    assert tok.decode(ours).split()[:2] == reference.split()[:2]


def test_the_bundled_model_meets_the_bar_the_readme_reports():
    """The dsv4-tiny issue's bar, from the FP8 + FP4 files on CPU, on the fixed held-out split
    `dsv4 eval` uses: a change to the model, the quantised formats, the engine or the chat
    encoder that damages what the model learned shows up here."""
    scores = evaluate(BUNDLED)  # 200 examples, greedy, fp32
    assert scores["num_examples"] == 200
    assert scores["arithmetic_accuracy"] >= 0.9  # README: 0.925 (86 of 93)
    assert scores["tool_call_accuracy"] >= 0.9  # README: 1.000
    assert scores["mtp_acceptance"] >= 0.5  # README: 0.999
