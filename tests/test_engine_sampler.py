"""SamplingParams validation and the batched sampler."""

from __future__ import annotations

import pytest
import torch

from dsv4.engine.sampler import SamplingBatch, argmax_only, sample
from dsv4.engine.sampling_params import SamplingParams

VOCAB = 50


def _batch(params, outputs=None, prompts=None, eos=None):
    n = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    prompts = prompts if prompts is not None else [[0] for _ in range(n)]
    return SamplingBatch.build(params, prompts, outputs, VOCAB, eos_token_id=eos)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": ["a", ""]}, "stop"),
        # wrong types: named, not a bare TypeError from a comparison (or a request that fails
        # later, inside a step, and stays queued)
        ({"logprobs": 2.5}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": [1]}, "stop"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": None}, "top_p"),
        ({"max_tokens": True}, "max_tokens"),
        ({"top_k": 2.0}, "top_k"),
        ({"seed": "7"}, "seed"),
        ({"ignore_eos": "no"}, "ignore_eos"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
    ],
)
def test_sampling_params_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**kwargs)


def test_sampling_params_normalises():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k == 0
    p = SamplingParams(stop=None, stop_token_ids=7)
    assert p.stop == [] and p.stop_token_ids == [7]
    children = [SamplingParams(n=3, seed=7).for_child(i) for i in range(3)]
    assert [c.seed for c in children] == [7, 8, 9] and all(c.n == 1 for c in children)


def test_greedy_is_exact_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    out = sample(logits, _batch([SamplingParams(temperature=0.0)] * 6))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_temperatures_too_small_to_divide_by_are_greedy():
    # float32 logits divided by 1e-40 overflow to inf and the softmax to NaN: such a request
    # must get the greedy answer, not a meaningless token
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB) * 5
    params = [SamplingParams(temperature=t, seed=0) for t in (1e-40, 1e-20, 9e-6)]
    assert all(p.is_greedy for p in params)
    assert torch.equal(sample(logits, _batch(params)).token_ids, logits.argmax(-1))
    assert not SamplingParams(temperature=1e-4).is_greedy


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, VOCAB) * 3
    params = [SamplingParams(temperature=1.5, top_k=1)] * 4 + [
        SamplingParams(temperature=1.5, top_p=1e-6)
    ] * 4
    for _ in range(5):  # random draws, always the argmax
        assert torch.equal(sample(logits, _batch(params)).token_ids, logits.argmax(-1))


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (VOCAB - 4)]))
    logits = logits.repeat(400, 1)
    topk = sample(logits, _batch([SamplingParams(top_k=2, seed=i) for i in range(400)]))
    assert set(topk.token_ids.tolist()) == {0, 1}
    # top_p=0.8: mass before token 1 is 0.5 < 0.8, before token 2 it is 0.8 -> dropped.
    topp = sample(logits, _batch([SamplingParams(top_p=0.8, seed=i) for i in range(400)]))
    assert set(topp.token_ids.tolist()) == {0, 1}


def test_min_p_masks_unlikely_tokens():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (VOCAB - 4))
    logits = torch.log(probs.clamp(min=1e-12)).repeat(400, 1)
    out = sample(logits, _batch([SamplingParams(min_p=0.6, seed=i) for i in range(400)]))
    # threshold 0.6 * 0.4 = 0.24: tokens 0 and 1 survive, both must occur in 400 draws.
    assert set(out.token_ids.tolist()) == {0, 1}


def test_penalties_change_exactly_the_right_logits():
    from dsv4.engine.sampler import apply_penalties

    logits = torch.zeros(3, VOCAB)
    logits[:, 5] = 2.0
    logits[:, 6] = -2.0
    params = [
        SamplingParams(presence_penalty=0.5),
        SamplingParams(frequency_penalty=0.25),
        SamplingParams(repetition_penalty=2.0),
    ]
    outputs = [[7, 7, 7], [7, 7, 7], [5]]
    prompts = [[5], [5], [6]]
    pen = apply_penalties(logits.clone(), _batch(params, outputs, prompts))
    expected = logits.clone()
    expected[0, 7] -= 0.5  # presence counts output tokens only, once
    expected[1, 7] -= 0.75  # frequency: 3 occurrences
    expected[2, 5] = 1.0  # repetition: positive logit divided (output token)
    expected[2, 6] = -4.0  # negative logit multiplied (prompt token counts too)
    assert torch.equal(pen, expected)


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, VOCAB)
    logits[:, 1] = 100.0  # eos
    logits[:, 9] = 90.0  # a stop token id
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9])
    early = sample(logits, _batch([params, params], outputs=[[2], [2, 3, 4]], eos=1))
    assert early.token_ids.tolist()[0] not in (1, 9)
    assert early.token_ids.tolist()[1] == 1  # min_tokens reached: eos allowed again


def test_seeded_rows_reproducible_whatever_the_batch():
    torch.manual_seed(2)
    logits = torch.randn(5, VOCAB)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = sample(logits[2:3], _batch([mine], outputs=[[1, 2]])).token_ids.item()
    others = [SamplingParams(temperature=0.8, seed=s) for s in (1, 2)] + [
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.0),
    ]
    for perm in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [2, 4, 3, 1, 0]):
        # row 2 is ours; the others vary in position and parameters
        params = others[:2] + [mine] + others[2:]
        outs = [[1, 2] if i == 2 else [] for i in range(5)]
        res = sample(logits[perm], _batch([params[i] for i in perm], [outs[i] for i in perm]))
        assert res.token_ids[perm.index(2)].item() == alone
    # a different step index draws different noise, so over many steps the draws vary
    draws = {
        sample(logits[2:3], _batch([mine], outputs=[[0] * k])).token_ids.item() for k in range(40)
    }
    assert len(draws) > 1


def test_n_children_draw_distinct_samples():
    logits = torch.zeros(1, VOCAB)  # uniform: distinct seeds must give varied tokens
    kids = [SamplingParams(n=8, seed=3).for_child(i) for i in range(8)]
    toks = sample(logits.repeat(8, 1), _batch(kids)).token_ids.tolist()
    assert len(set(toks)) > 1


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(3, VOCAB)
    params = [
        SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, top_k=3, logprobs=2, seed=0),
        SamplingParams(temperature=0.0),
    ]
    out = sample(logits, _batch(params, outputs=[[4], [], []]))
    ref = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    top_vals, top_ids = ref.topk(5, dim=-1)
    assert torch.equal(out.top_token_ids, top_ids)
    assert torch.allclose(out.top_logprobs, top_vals)


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1] + [0.0] * (VOCAB - 4))
    logits = torch.log(probs.clamp(min=1e-30)).repeat(4000, 1)
    out = sample(logits, _batch([SamplingParams(seed=i) for i in range(4000)])).token_ids
    freq = torch.bincount(out, minlength=VOCAB).float() / 4000
    assert torch.allclose(freq[:4], probs[:4], atol=0.03) and freq[4:].sum() < 0.001
    # temperature 2 flattens: p ~ sqrt(probs)
    hot = sample(logits, _batch([SamplingParams(seed=i, temperature=2.0) for i in range(4000)]))
    freq = torch.bincount(hot.token_ids, minlength=VOCAB).float()[:4] / 4000
    assert torch.allclose(freq, probs[:4].sqrt() / probs[:4].sqrt().sum(), atol=0.03)


@pytest.mark.parametrize("num_candidates", [3, 16, VOCAB])
def test_candidate_shortcut_is_exact(monkeypatch, num_candidates):
    """Top-k/top-p/min-p through the top-K candidates or through a full sort: same tokens."""
    import dsv4.engine.sampler as sampler_mod

    g = torch.Generator().manual_seed(5)
    rows = 60
    # peaked and flat rows, so both paths are taken for small K
    logits = torch.randn(rows, VOCAB, generator=g) * torch.linspace(0.1, 6.0, rows)[:, None]
    params = [
        SamplingParams(
            seed=i,
            temperature=0.7 + (i % 3) * 0.3,
            top_k=[0, 1, 5, 20, 45][i % 5],
            top_p=[1.0, 0.5, 0.9, 0.99][i % 4],
            min_p=[0.0, 0.0, 0.05, 0.2][(i // 4) % 4],
        )
        for i in range(rows)
    ]
    ref = sample(logits, _batch(params)).token_ids  # default CANDIDATES (>= VOCAB here)
    monkeypatch.setattr(sampler_mod, "CANDIDATES", num_candidates)
    assert torch.equal(sample(logits, _batch(params)).token_ids, ref)


@pytest.mark.parametrize("extra", [dict(temperature=0.5), dict(presence_penalty=0.1),
                                   dict(frequency_penalty=0.1), dict(repetition_penalty=1.1),
                                   dict(logprobs=0), dict(min_tokens=3)])
def test_only_plain_greedy_rows_skip_the_sampler(extra):
    plain = SamplingParams(temperature=0.0)
    assert argmax_only([plain, plain], [[5], []])
    other = SamplingParams(**{"temperature": 0.0, **extra})
    assert not argmax_only([plain, other], [[5], [1, 2]])
    if "min_tokens" in extra:  # the ban ends once min_tokens tokens are out
        assert argmax_only([plain, other], [[5], [1, 2, 3]])
