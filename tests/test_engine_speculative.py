"""Speculative decoding with the MTP layer as the drafter: the drafts are the model's own MTP
predictions, and verifying them changes no output (greedy, seeded sampling, penalties, stops,
logprobs, preemption), only how many tokens a step yields."""

from __future__ import annotations

import pytest
import torch
from v4_oracle import hf_model, released_state_dict, tiny_args

import dsv4
from dsv4.chat import Tokenizer
from dsv4.checkpoint.writer import write_checkpoint
from dsv4.engine.config import EngineConfig
from dsv4.engine.kv_cache import CacheSpec, KVCacheLayout
from dsv4.engine.llm import LLM
from dsv4.engine.model_runner import V4ModelRunner
from dsv4.engine.sampling_params import SamplingParams
from dsv4.train.data import eval_examples
from dsv4.train.evaluate import BUNDLED, _prompts


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """The transformers oracle's random weights plus a random MTP layer."""
    args = tiny_args()
    path = tmp_path_factory.mktemp("v4")
    write_checkpoint(released_state_dict(hf_model(args), args), path, config=args.to_dict())
    g = torch.Generator().manual_seed(1)
    lengths = [5, 40, 130, 260]  # inside one window, across windows and HCA entries
    prompts = [torch.randint(2, args.vocab_size, (n,), generator=g).tolist() for n in lengths]
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32, kv_cache_dtype="auto",
                            indexer_cache_dtype="auto")
    return path, model, prompts


def _engine_kwargs(**overrides):
    kwargs = dict(device="cpu", dtype="fp32", max_num_seqs=8, max_num_batched_tokens=64,
                  kv_cache_memory_bytes=64 << 20)
    kwargs.update(overrides)
    return kwargs


def test_drafts_are_the_mtp_layers_own_predictions(random_checkpoint):
    path, model, prompts = random_checkpoint
    llm = LLM(model=str(path), num_speculative_tokens=1, **_engine_kwargs())
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    drafts = {rid: {} for rid in ids}  # request -> {position drafted: token}
    outputs = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            outputs[out.request_id] = out.token_ids
        for req in llm.engine.scheduler.running:
            if req.draft_token_ids:
                drafts[req.request_id][req.num_tokens] = req.draft_token_ids[0]
    for rid, prompt in zip(ids, prompts):
        seq = torch.tensor([prompt + outputs[rid]])
        with torch.inference_mode():
            plain = model.generate(torch.tensor([prompt]), 24)[0].tolist()
            # the MTP at position p sees the main streams at p and token p + 1: predicts p + 2
            mtp = model.mtp_forward(model.forward_streams(seq)[:, :-1], seq[:, 1:])[0]
        assert seq[0].tolist() == plain
        expected = {p + 2: int(mtp[p].argmax()) for p in range(len(prompt) - 1, seq.shape[1] - 1)}
        assert drafts[rid] and drafts[rid].items() <= expected.items()


def test_preemption_with_drafts_gives_the_same_outputs(random_checkpoint):
    path, model, prompts = random_checkpoint
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(model=str(path), **_engine_kwargs()).generate(prompts * 2, params)
    # 8 requests, state for all, but 4 blocks of 128 tokens: they must take turns
    spec = CacheSpec.from_config(model.args, num_mtp_layers=1)
    layout = KVCacheLayout(spec, block_size=128, num_blocks=4, num_state_slots=8)
    llm = LLM(runner=V4ModelRunner(model, layout, max_model_len=512), max_num_seqs=8,
              max_num_batched_tokens=64, num_speculative_tokens=1)
    outs = llm.generate(prompts * 2, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]


@pytest.fixture(scope="module")
def bundled():
    """dsv4-tiny (a trained MTP layer) and held-out chat prompts of every kind."""
    tok = Tokenizer.from_folder(BUNDLED)
    examples = eval_examples(40)
    picked = [next(e for e in examples if e.family == f and e.thinking_mode == m)
              for f, m in (("arithmetic", "thinking"), ("arithmetic", "chat"),
                           ("tool", "thinking"), ("chat", "chat"))]
    prompts = [tok.encode(p) for p, _, _ in _prompts(picked)]

    def generate(params, **kwargs):
        llm = LLM(model=str(BUNDLED), tokenizer=tok, **_engine_kwargs(**kwargs))
        return llm, llm.generate(prompts, params)

    return generate


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=40),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=33, logprobs=2,
                   presence_penalty=0.5, repetition_penalty=1.1, min_tokens=5),
    SamplingParams(temperature=0, max_tokens=60, stop=[" = "], stop_token_ids=[5]),
    # kept stop strings end the request at the token that completes them, even when the step
    # that yields it yields one more (the server ends a forced tool call this way)
    SamplingParams(temperature=0, max_tokens=60, stop_after=[" + ", "</think>"],
                   skip_special_tokens=False),
], ids=["greedy", "seeded-penalised", "stops", "kept-stops"])
def test_speculative_decoding_changes_no_output(bundled, params):
    _, plain = bundled(params)
    llm, spec = bundled(params, num_speculative_tokens=1)
    for a, b in zip(plain, spec):
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == \
            (a.token_ids, a.text, a.finish_reason, a.stop_reason)
        if a.stop_reason in params.stop_after:
            assert a.text.endswith(a.stop_reason)
        if params.logprobs:
            assert [t.token_id for t in b.logprobs] == [t.token_id for t in a.logprobs]
            assert [t.logprob for t in b.logprobs] == \
                pytest.approx([t.logprob for t in a.logprobs], abs=1e-4)
    if params.stop_after:  # a kept string did end a request
        assert any(o.stop_reason in params.stop_after for o in plain)
    stats = llm.engine.stats()
    assert stats["spec_decode_draft_tokens_total"] > 0
    if params.temperature == 0:  # a trained MTP layer guesses the greedy next token well
        acceptance = stats["spec_decode_accepted_tokens_total"] / \
            stats["spec_decode_draft_tokens_total"]
        assert acceptance > 0.8, acceptance


def test_drafting_needs_an_mtp_layer(tmp_path):
    args = tiny_args(num_nextn_predict_layers=0, compress_ratios=[0, 4, 128, 4])
    write_checkpoint(released_state_dict(hf_model(args), args), tmp_path, config=args.to_dict())
    with pytest.raises(ValueError, match="num_nextn_predict_layers.*num_speculative_tokens=0"):
        LLM(model=str(tmp_path), num_speculative_tokens=1, **_engine_kwargs())
    with pytest.raises(ValueError, match="num_speculative_tokens=2"):
        EngineConfig(num_speculative_tokens=2)
