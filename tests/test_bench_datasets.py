"""Workloads: random prompts of exact token length (with a BPE tokenizer trained here), ShareGPT
JSON and JSONL files."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4.bench.datasets import (
    TextTokenizer,
    jsonl_requests,
    load_requests,
    random_requests,
    sharegpt_requests,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps",
    "serving benchmarks measure time to first token and time per output token",
    "DeepSeek V4 runs on Ascend NPUs and NVIDIA GPUs; cost per million tokens matters.",
    "Numbers 0123456789 and punctuation !?.,;: appear in prompts too",
] * 20


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A byte-level BPE tokenizer.json, trained in a blink on a tiny corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_random_prompts_have_exact_token_lengths(tok_path):
    tok = TextTokenizer(tok_path)
    assert tok.tok.token_to_id("<bos>") not in tok.plain_ids  # never sample special tokens
    samples = random_requests(20, 37, 9, tokenizer=tok, seed=1)
    assert len(samples) == 20
    for s in samples:
        assert tok.count(s.prompt) == 37 == s.prompt_len
        assert s.output_len == 9
    assert len({s.prompt for s in samples}) == 20  # different prompts
    again = random_requests(20, 37, 9, tokenizer=TextTokenizer(tok_path.parent), seed=1)
    assert [s.prompt for s in again] == [s.prompt for s in samples]  # seeded


def test_random_range_ratio(tok_path):
    tok = TextTokenizer(tok_path)
    samples = random_requests(40, 50, 20, tokenizer=tok, range_ratio=0.5, seed=2)
    lens = [tok.count(s.prompt) for s in samples]
    assert lens == [s.prompt_len for s in samples]
    assert min(lens) >= 25 and max(lens) <= 75 and len(set(lens)) > 5
    assert all(10 <= s.output_len <= 30 for s in samples)


def test_random_without_tokenizer_is_approximate_words():
    s = random_requests(3, 16, 4, seed=0)
    assert all(len(x.prompt.split()) == 16 and x.prompt_len is None for x in s)


SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "the quick brown fox jumps over the lazy dog"},
        {"from": "gpt", "value": "serving benchmarks measure time to first token"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "only one turn"}]},
    {"id": "c", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "too short prompt pair"}]},
    {"id": "d", "conversations": [
        {"from": "human", "value": "DeepSeek V4 runs on Ascend NPUs and NVIDIA GPUs"},
        {"from": "gpt", "value": "cost per million tokens matters to everyone here"},
        {"from": "human", "value": "and then?"}]},
]


def test_sharegpt_filters_and_sizes_outputs(tmp_path, tok_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(SHAREGPT))
    tok = TextTokenizer(tok_path)
    samples = sharegpt_requests(path, 2, tokenizer=tok, seed=0)
    prompts = {s.prompt for s in samples}
    assert prompts == {SHAREGPT[0]["conversations"][0]["value"],
                       SHAREGPT[3]["conversations"][0]["value"]}  # 1 turn and <4 tokens dropped
    for s in samples:
        reply = next(c["conversations"][1]["value"] for c in SHAREGPT
                     if c["conversations"][0]["value"] == s.prompt)
        assert s.output_len == tok.count(reply)
        assert s.prompt_len == tok.count(s.prompt)
    fixed = sharegpt_requests(path, 5, output_len=7)  # cycles to 5, fixed output length
    assert len(fixed) == 5 and {s.output_len for s in fixed} == {7}


def test_sharegpt_needs_a_way_to_size_outputs(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(SHAREGPT))
    with pytest.raises(ValueError, match="--tokenizer"):
        sharegpt_requests(path, 2)


def test_jsonl_prompts_and_messages(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "hello there", "output_len": 5}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "why?"}], "max_tokens": 3}),
        json.dumps({"prompt": "uses the default"}),
    ]))
    samples = jsonl_requests(path, 4, output_len=11)
    assert [s.output_len for s in samples] == [5, 3, 11, 5]
    assert samples[1].messages[1]["content"] == "why?"
    assert samples[3].prompt == "hello there"  # cycled
    with pytest.raises(ValueError, match="output_len"):
        jsonl_requests(path, 3)


def test_bad_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "output_len": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        jsonl_requests(bad, 1)
    with pytest.raises(ValueError, match="does not exist"):
        load_requests("jsonl", 1, dataset_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="--dataset-path"):
        load_requests("sharegpt", 1)
    with pytest.raises(ValueError, match="tokenizer.json"):
        TextTokenizer(tmp_path)


def test_jsonl_trace_timestamps(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"prompt": "a", "output_len": 3, "timestamp": 1500}\n'
                    '{"prompt": "b", "output_len": 3, "timestamp": 1000}\n'
                    '{"prompt": "c", "output_len": 3, "timestamp": 1250.5}\n')
    samples = jsonl_requests(path, 3)
    assert [s.send_time_s for s in samples] == pytest.approx([0.5, 0.0, 0.2505])
    with pytest.raises(ValueError, match="fewer than --num-prompts 4"):
        jsonl_requests(path, 4)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "output_len": 3, "timestamp": 1}\n'
                     '{"prompt": "b", "output_len": 3}\n')
    with pytest.raises(ValueError, match="every line"):
        jsonl_requests(mixed, 2)
