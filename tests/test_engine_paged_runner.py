"""The paged hybrid cache carries real V4 attention (runner: tests/engine_v4_oracle.py).

Chunked and ragged prefill give the same logits as one full forward of `transformers`' model,
and greedy generation through the engine, with any batch composition and with preemption,
equals `transformers`' generate.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from engine_v4_oracle import (  # noqa: E402
    SPEC_FP8,
    HFPagedRunner,
    hf_greedy,
    make_engine,
    make_model,
    random_prompts,
)

from dsv4.engine.batch import build_batch  # noqa: E402
from dsv4.engine.sampling_params import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    return make_model()


def _prefill_logits(model, prompt: list[int], chunk: int, **kw) -> torch.Tensor:
    """Logits at every prompt position, computing the prompt in chunks of `chunk` tokens."""
    return _prefill_logits_with(make_engine(model, budget=chunk, **kw), prompt)


def _prefill_logits_with(eng, prompt: list[int]) -> torch.Tensor:
    rid = eng.add_request(prompt, SamplingParams(max_tokens=1))
    req = eng._groups[rid][0]
    rows = []
    while req.num_computed_tokens < len(prompt):
        out = eng.scheduler.schedule()
        batch = build_batch(out, eng.layout)
        n = batch.num_tokens
        batch.logits_indices = torch.arange(n)  # ask for every position's logits
        rows.append(eng.runner.execute_model(batch))
        req.num_computed_tokens += n
    return torch.cat(rows)


def test_prefill_logits_equal_transformers_for_any_chunk_size(hf_model):
    # 300 tokens: two closed HCA windows (128) and 75 CSA entries, more than index_topk
    prompt = random_prompts(1, seed=1, lo=300, hi=301)[0]
    ref = hf_model(torch.tensor([prompt])).logits[0].float()
    for chunk in (1, 3, 5, 64, 127, 300):
        got = _prefill_logits(hf_model, prompt, chunk)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4, msg=f"chunk={chunk}")


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_greedy_32_ragged_requests_equal_alone_and_transformers(hf_model):
    prompts = random_prompts(32, seed=2, hi=150)
    together = make_engine(hf_model, budget=200).generate(prompts, GREEDY)
    for p, out in zip(prompts[:4], together[:4]):
        assert out.token_ids == make_engine(hf_model).generate([p], GREEDY)[0].token_ids
    for p, out in zip(prompts, together):
        assert out.token_ids == hf_greedy(hf_model, p, 6)


def test_preemption_recompute_gives_the_same_greedy_outputs(hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = random_prompts(4, seed=3, lo=100, hi=120)
    ample = make_engine(hf_model).generate(prompts, params)
    small = make_engine(hf_model, num_blocks=5)
    outs = small.generate(prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ample]
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf_model, p, 30)


def test_fp8_cache_stores_real_fp8_entries_losslessly():
    model = make_model(head_dim=512, rope_head_dim=64, index_head_dim=128)  # released geometry
    prompt = random_prompts(1, seed=4, lo=150, hi=151)[0]
    whole = _prefill_logits(model, prompt, 150, spec=SPEC_FP8)
    eng = make_engine(model, spec=SPEC_FP8)
    assert eng.runner.pools["1.compressed_kv"].dtype == torch.uint8
    assert eng.runner.pools["1.compressed_kv"].shape[-1] == 584
    # The same forward with the entries quantised but kept in fp32 pools: the 584-byte storage
    # must lose nothing beyond the e4m3 format itself.
    sim_eng = make_engine(
        model, budget=150, spec=dataclasses.replace(SPEC_FP8, kv_cache_dtype="bf16")
    )
    sim_eng.runner = HFPagedRunner(model, sim_eng.layout, quantize_kv=True)
    sim = _prefill_logits_with(sim_eng, prompt)
    torch.testing.assert_close(whole, sim, atol=1e-5, rtol=1e-4)
    # chunks read back the entries earlier chunks stored. Not bit-identical: fp32 rounding
    # varies a little with the batch shape and can move a value across an e4m3 rounding
    # boundary (one quantisation step), so allow a small tolerance.
    for chunk in (7, 64):
        got = _prefill_logits(model, prompt, chunk, spec=SPEC_FP8)
        torch.testing.assert_close(got, whole, atol=1e-2, rtol=0)
