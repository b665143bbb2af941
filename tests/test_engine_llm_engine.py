"""LLMEngine end to end: sampling, stop strings, streaming, abort and the LLM facade.

The engine runs `transformers`' DeepSeek-V4 network on a tiny random config through the paged
cache (tests/engine_v4_oracle.py); the greedy / chunking / preemption equalities with
`transformers` are in test_engine_paged_runner.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("transformers")

from engine_v4_oracle import (  # noqa: E402
    SPEC,
    HFPagedRunner,
    hf_greedy,
    make_engine,
    make_model,
    random_prompts,
)

from dsv4.engine.kv_cache import KVCacheLayout  # noqa: E402
from dsv4.engine.sampling_params import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_model():
    return make_model()


class CharTokenizer:
    """Test double for a tokenizer over the tiny model's 256 ids: each id is one printable
    ASCII character (many ids share one), so any output decodes to text."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i % 95) for i in ids)


def _engine(model, budget=256, tokenizer=None):
    return make_engine(model, budget=budget, tokenizer=tokenizer)


def _prompts(n: int, seed: int) -> list[list[int]]:
    return random_prompts(n, seed)


def test_seeded_sampling_reproducible_across_batch_compositions(hf_model):
    mine = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=8, ignore_eos=True)
    prompt = _prompts(1, seed=5)[0]
    alone = _engine(hf_model).generate([prompt], mine)[0].token_ids
    others = _prompts(5, seed=6)
    mixed_params = [SamplingParams(temperature=0.9, max_tokens=5, seed=s) for s in range(5)]
    mixed = _engine(hf_model, budget=40).generate(
        others[:3] + [prompt] + others[3:], mixed_params[:3] + [mine] + mixed_params[3:]
    )
    assert mixed[3].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=8, ignore_eos=True)
    assert _engine(hf_model).generate([prompt], other_seed)[0].token_ids != alone


def test_n_samples_and_logprobs(hf_model):
    prompt = _prompts(1, seed=7)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=5, logprobs=3, ignore_eos=True)
    out = _engine(hf_model).generate([prompt], params)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    seq = out.outputs[1]
    ref = torch.log_softmax(
        hf_model(torch.tensor([prompt + seq.token_ids])).logits[0].float(), dim=-1
    )
    for k, lp in enumerate(seq.logprobs):
        row = ref[len(prompt) - 1 + k]
        assert lp.token_id == seq.token_ids[k]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


def test_stop_string_across_tokens_end_to_end(hf_model):
    prompt = _prompts(1, seed=8)[0]
    eng = _engine(hf_model, tokenizer=CharTokenizer())
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = eng.generate([prompt], base)[0]
    ids = full.token_ids
    stop = CharTokenizer().decode(ids[3:5])  # spans two tokens
    assert len(stop) == 2
    cut = eng.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], ignore_eos=True)
    )[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]


def test_over_long_prompt_rejected_at_once_naming_both_lengths(hf_model):
    eng = _engine(hf_model)
    with pytest.raises(ValueError, match=r"prompt has 2040 tokens and max_tokens=16.*2048"):
        eng.add_request([5] * 2040, SamplingParams(max_tokens=16))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        eng.add_request([5, 300])
    with pytest.raises(ValueError, match=r"SamplingParams.stop and stop_after need text"):
        eng.add_request([5], SamplingParams(stop=["x"]))
    assert not eng.has_unfinished_requests()
    for bad in ([1.9, 2.7], {"ids": [1]}, None, [], ["5"]):
        with pytest.raises(ValueError, match="prompt"):
            eng.add_request(bad)
    # a bad prompt in a batch leaves nothing queued: the next call runs only its own prompts
    with pytest.raises(ValueError):
        eng.generate([[5, 6], [5, 300]], SamplingParams(max_tokens=2))
    assert not eng.has_unfinished_requests()
    assert len(eng.generate([[5, 6]], SamplingParams(max_tokens=2))) == 1


def test_abort_and_async_stream(hf_model):
    eng = _engine(hf_model)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def main():
        rid = eng.add_request(_prompts(1, seed=9)[0], params)
        gone = eng.add_request(_prompts(1, seed=10)[0], SamplingParams(max_tokens=50))
        stream = eng.open_stream(rid)
        eng.step()
        assert eng.abort(gone) and not eng.abort(gone)
        seen = []

        async def consume():
            async for out in stream:
                seen.append(list(out.token_ids))

        task = asyncio.create_task(consume())
        while eng.has_unfinished_requests():
            await asyncio.to_thread(eng.step)  # stepping from another thread, as a server may
        await task
        return seen

    seen = asyncio.run(main())
    assert [len(s) for s in seen] == [1, 2, 3, 4]
    assert eng.block_manager.num_free_blocks == 64 and eng.num_unfinished_requests == 0
    stats = eng.stats()
    assert stats["num_requests_running"] == 0 and stats["kv_cache_usage"] == 0.0
    # the synchronous iterator yields the same growing outputs
    rid = eng.add_request(_prompts(1, seed=9)[0], params)
    outs = list(eng.iter_outputs(rid))
    assert [o.token_ids for o in outs] == seen and outs[-1].finish_reason == "length"


def test_llm_facade_with_a_runner_and_config_validation(hf_model):
    from dsv4.engine.config import EngineConfig
    from dsv4.engine.llm import LLM

    layout = KVCacheLayout(SPEC, block_size=128, num_blocks=8, num_state_slots=4)
    llm = LLM(
        runner=HFPagedRunner(hf_model, layout),
        max_num_seqs=4,
        max_num_batched_tokens=32,
        tokenizer=CharTokenizer(),
    )
    prompt = _prompts(1, seed=11)[0]
    (bare,) = llm.generate(prompt, GREEDY)
    assert bare.token_ids == hf_greedy(hf_model, prompt, 6)
    (text_out,) = llm.generate(["hello"], GREEDY)
    assert text_out.text == CharTokenizer().decode(text_out.token_ids)
    with pytest.raises(ValueError, match=r"EngineConfig.block_size=100"):
        EngineConfig(block_size=100)
    with pytest.raises(ValueError, match=r"EngineConfig.max_num_seqs=0"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp4'"):
        EngineConfig(kv_cache_dtype="fp4")


def test_cache_layout_for_the_released_flash_config():
    import json
    from pathlib import Path

    from dsv4.engine.config import EngineConfig
    from dsv4.engine.llm import cache_layout_for

    cfg = json.loads(
        (Path(__file__).parent / "data/configs/deepseek-v4-flash.config.json").read_text()
    )
    cfg_engine = EngineConfig(
        kv_cache_dtype="fp8",
        kv_cache_memory_bytes=8 << 30,
        max_num_seqs=64,
        reference_seq_len=32768,
    )
    layout = cache_layout_for(cfg, cfg_engine)
    assert layout.spec.entry_bytes == 584 and layout.total_bytes <= 8 << 30
    # balanced: the slots and blocks serve the same number of 32k-token requests
    per_seq_blocks = layout.blocks_needed(32768)
    assert layout.num_blocks // per_seq_blocks == layout.num_state_slots


def test_llm_refuses_a_context_longer_than_the_model_and_an_empty_cache():
    from dsv4.engine.llm import LLM
    from dsv4.train.evaluate import BUNDLED

    with pytest.raises(ValueError, match=r"max_model_len=1000000000 .*=65536"):
        LLM(model=str(BUNDLED), device="cpu", dtype="fp32", max_model_len=10**9)
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):  # was the 1 GiB default
        LLM(model=str(BUNDLED), device="cpu", dtype="fp32", kv_cache_memory_bytes=0)


def test_generate_builds_only_final_outputs_and_step_reports_every_step(hf_model, monkeypatch):
    """An output copies its request's tokens so far: offline generate reads only finished
    ones, so it builds no others; `step` still reports every updated request at every step,
    which a server's streams read."""
    eng = _engine(hf_model)
    reported, report = [], eng._report
    monkeypatch.setattr(eng, "_report", lambda rid: reported.append(rid) or report(rid))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 6)]
    outs = eng.generate(_prompts(2, seed=9), params)
    assert [len(o.token_ids) for o in outs] == [3, 6] and all(o.finished for o in outs)
    assert sorted(reported) == sorted(o.request_id for o in outs)
    reported.clear()
    rid = eng.add_request(_prompts(1, seed=10)[0], params[1])
    steps = 0
    while eng.has_unfinished_requests():
        assert [o.request_id for o in eng.step()] == [rid]
        steps += 1
    assert reported == [rid] * steps


def test_greedy_min_tokens_holds_back_eos_through_the_engine(hf_model):
    """Plain greedy batches skip the sampler's tensors (`argmax_only`); a greedy request whose
    min_tokens bans EOS must not: here EOS is the token greedy decoding picks first."""
    prompt = _prompts(1, seed=9)[0]
    first = _engine(hf_model).generate([prompt], GREEDY)[0].token_ids[0]
    engine = _engine(hf_model)
    engine.eos_token_id = first
    plain = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert plain.token_ids == [first] and plain.finish_reason == "stop"
    held = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4,
                                                    min_tokens=2))[0]
    assert held.token_ids[0] != first and len(held.token_ids) >= 2
