"""The paged hybrid cache carries real V4 attention (runner: tests/engine_v4_oracle.py).

Chunked and ragged prefill give the same logits as one full forward of `transformers`' model,
and greedy generation through the engine, with any batch composition and with preemption,
equals `transformers`' generate.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from engine_v4_oracle import hf_greedy, make_engine, make_model, random_prompts  # noqa: E402

from dsv4.engine.batch import build_batch  # noqa: E402
from dsv4.engine.sampling_params import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    return make_model()


def _prefill_logits(model, prompt: list[int], chunk: int) -> torch.Tensor:
    """Logits at every prompt position, computing the prompt in chunks of `chunk` tokens."""
    eng = make_engine(model, budget=chunk)
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
