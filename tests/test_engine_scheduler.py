"""Continuous-batching scheduler: budgets, chunking, admission, preemption, abort, rejection.

These tests drive the scheduler the way the engine does (schedule -> sampled tokens ->
update_from_output) with the sampled token fixed at 7: the scheduler never looks at logits,
so no model is needed to check its decisions.
"""

from __future__ import annotations

import pytest

from dsv4.engine.block_manager import BlockManager
from dsv4.engine.kv_cache import CacheSpec, KVCacheLayout
from dsv4.engine.request import Request, RequestStatus
from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.scheduler import Scheduler

SPEC = CacheSpec(num_hidden_layers=2, compress_ratios=(0, 4))


def _sched(num_blocks=64, slots=8, max_num_seqs=8, budget=64, max_model_len=4096):
    layout = KVCacheLayout(SPEC, block_size=128, num_blocks=num_blocks, num_state_slots=slots)
    return Scheduler(BlockManager(layout), max_num_seqs, budget, max_model_len)


def _req(rid: str, n_prompt: int, max_tokens: int = 8, **kw) -> Request:
    return Request(rid, [5] * n_prompt, SamplingParams(max_tokens=max_tokens, **kw))


def _step(s: Scheduler):
    out = s.schedule()
    sampled = {e.request.request_id: [(7, None)] for e in out.scheduled if e.samples}
    s.update_from_output(out, sampled)
    return out


def _plan(out):
    return [(e.request.request_id, e.num_new_tokens) for e in out.scheduled]


def test_chunked_prefill_of_any_size_under_the_token_budget():
    s = _sched(budget=5)
    s.add_request(_req("a", 13))
    plans = [_plan(_step(s)) for _ in range(4)]
    assert plans == [[("a", 5)], [("a", 5)], [("a", 3)], [("a", 1)]]
    a = s.running[0]
    assert a.num_computed_tokens == 14 and a.output_token_ids == [7, 7]


def test_new_requests_join_running_ones_decodes_first():
    s = _sched(budget=6)
    s.add_request(_req("a", 4))
    _step(s)  # a: whole prompt, samples its first token
    s.add_request(_req("b", 10))
    out = _step(s)
    assert _plan(out) == [("a", 1), ("b", 5)]  # decode first, prefill gets the rest
    assert [e.is_prefill for e in out.scheduled] == [False, True]
    assert [e.samples for e in out.scheduled] == [True, False]
    assert _plan(_step(s)) == [("a", 1), ("b", 5)]
    assert _plan(_step(s)) == [("a", 1), ("b", 1)]  # b's prefill done, now both decode
    for out in (_step(s) for _ in range(3)):
        assert out.num_batched_tokens <= 6


def test_max_num_seqs_and_fcfs_without_overtaking():
    s = _sched(max_num_seqs=2, budget=100)
    for rid in "abc":
        s.add_request(_req(rid, 3))
    assert [r for r, _ in _plan(_step(s))] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]
    # d is small but c arrived first and does not fit the blocks: d must wait behind it
    s2 = _sched(num_blocks=3, budget=1000)
    s2.add_request(_req("a", 200))
    s2.add_request(_req("c", 300))
    s2.add_request(_req("d", 2))
    assert [r for r, _ in _plan(_step(s2))] == ["a"]
    assert [r.request_id for r in s2.waiting] == ["c", "d"]


def test_preemption_takes_the_newest_and_requeues_it_first():
    # 4 blocks of 128 tokens; three requests of 120 prompt tokens each fit (1 block each),
    # then a and b cross into their second block while decoding.
    s = _sched(num_blocks=4, budget=1000)
    for rid in "abc":
        s.add_request(_req(rid, 120, max_tokens=40))
    s.add_request(_req("d", 100, max_tokens=40))
    _step(s)  # admits a, b, c, d: 4 blocks used
    assert s.block_manager.num_free_blocks == 0
    preempted_order = []
    for _ in range(12):
        out = _step(s)
        preempted_order += [r.request_id for r in out.preempted]
        if out.preempted:
            assert s.waiting[0].request_id == out.preempted[-1].request_id
            assert out.preempted[-1].status is RequestStatus.PREEMPTED
            assert out.preempted[-1].num_computed_tokens == 0
    assert preempted_order[:2] == ["d", "c"]  # newest first; a and b (oldest) run on
    a = next(r for r in s.running if r.request_id == "a")
    assert a.num_preemptions == 0 and a.num_output_tokens == 13


def test_preempted_request_recomputes_prompt_and_outputs_then_finishes():
    s = _sched(num_blocks=2, budget=1000)
    s.add_request(_req("a", 126, max_tokens=8))
    s.add_request(_req("b", 120, max_tokens=8))
    finished = []
    for _ in range(60):
        out = s.schedule()
        for e in out.scheduled:
            if e.request.request_id == "b" and e.is_prefill and e.request.num_output_tokens:
                # recompute covers the prompt and the tokens generated before preemption
                assert e.start_pos + e.num_new_tokens == e.request.num_tokens
        sampled = {e.request.request_id: [(7, None)] for e in out.scheduled if e.samples}
        finished += [r for r in s.update_from_output(out, sampled) if r.is_finished]
        if not s.has_unfinished():
            break
    assert sorted(r.request_id for r in finished) == ["a", "b"]
    b = next(r for r in finished if r.request_id == "b")
    assert b.num_preemptions >= 1 and b.output_token_ids == [7] * 8
    assert all(r.finish_reason == "length" for r in finished)
    assert s.block_manager.num_free_blocks == 2 and s.block_manager.num_free_slots == 8


def test_a_requests_tokens_between_two_positions_span_prompt_and_outputs():
    # what a chunk computes: prompt-only (prefill), output-only (decode) or both (recompute
    # after a preemption), read without joining the two lists
    req = Request("a", [10, 11, 12], SamplingParams())
    req.output_token_ids += [20, 21]
    every = [10, 11, 12, 20, 21]
    for start in range(6):
        for end in range(start, 6):
            assert req.token_ids_between(start, end) == every[start:end], (start, end)


def test_abort_frees_everything():
    s = _sched(num_blocks=8, budget=1000)
    s.add_request(_req("a", 300))
    s.add_request(_req("b", 10))
    _step(s)
    s.add_request(_req("c", 10))
    assert s.abort("a").finish_reason == "abort"
    assert s.abort("c").status is RequestStatus.FINISHED_ABORTED  # still waiting
    assert s.abort("nope") is None
    s.abort("b")
    assert not s.has_unfinished()
    assert s.block_manager.num_free_blocks == 8 and s.block_manager.num_free_slots == 8


def test_over_long_requests_rejected_at_once_naming_both_lengths():
    s = _sched(num_blocks=4, max_model_len=1000)
    with pytest.raises(ValueError, match=r"prompt has 990 tokens and max_tokens=20.*1000"):
        s.add_request(_req("x", 990, max_tokens=20))
    s2 = _sched(num_blocks=4, max_model_len=100_000)
    with pytest.raises(ValueError, match=r"prompt has 600 tokens.*KV cache holds at most 512"):
        s2.add_request(_req("y", 600, max_tokens=1))
    assert not s.has_unfinished() and not s2.has_unfinished()


def test_stop_token_and_eos_finish_with_reason():
    s = _sched()
    r = _req("a", 3, max_tokens=50, stop_token_ids=[7])
    s.add_request(r)
    _step(s)
    assert r.finish_reason == "stop" and r.stop_reason == 7
    r2 = Request("b", [5, 5], SamplingParams(max_tokens=50), eos_token_id=7)
    s.add_request(r2)
    _step(s)
    assert r2.finish_reason == "stop" and r2.stop_reason is None
    r3 = Request("c", [5, 5], SamplingParams(max_tokens=3, ignore_eos=True), eos_token_id=7)
    s.add_request(r3)
    for _ in range(3):
        _step(s)
    assert r3.finish_reason == "length" and r3.output_token_ids == [7, 7, 7]


def _decode_with_draft(s: Scheduler, req: Request, draft: int, sampled: list[int]):
    req.draft_token_ids = [draft]
    out = s.schedule()
    (entry,) = out.scheduled
    s.update_from_output(out, {req.request_id: [(t, None) for t in sampled]})
    return entry


def test_a_draft_is_verified_with_the_decode_and_kept_only_while_it_matches():
    s = _sched()
    req = _req("a", 10, max_tokens=8)
    s.add_request(req)
    _step(s)  # prefill: 10 computed, one token sampled
    assert (req.num_computed_tokens, req.output_token_ids) == (10, [7])
    entry = _decode_with_draft(s, req, draft=9, sampled=[9, 4])  # the draft was right
    assert (entry.num_new_tokens, entry.token_ids, entry.num_samples) == (2, [7, 9], 2)
    assert (req.num_computed_tokens, req.output_token_ids) == (12, [7, 9, 4])
    _decode_with_draft(s, req, draft=3, sampled=[5, 6])  # wrong: the row after it is dropped
    assert (req.num_computed_tokens, req.output_token_ids) == (13, [7, 9, 4, 5])
    assert (s.num_draft_tokens, s.num_accepted_draft_tokens) == (2, 1)
    assert req.draft_token_ids == []  # the drafter proposes anew after every step


def test_a_draft_never_outruns_max_tokens_a_stop_or_the_budget():
    s = _sched()
    req = _req("a", 10, max_tokens=3, stop_token_ids=[9])
    s.add_request(req)
    _step(s)
    _decode_with_draft(s, req, draft=9, sampled=[9, 4])  # the draft is a stop token: no more
    assert (req.output_token_ids, req.finish_reason) == ([7, 9], "stop")
    req = _req("b", 10, max_tokens=2)
    s.add_request(req)
    _step(s)
    entry = _decode_with_draft(s, req, draft=7, sampled=[7])  # one token left: no draft
    assert (entry.num_new_tokens, req.output_token_ids, req.finish_reason) == (1, [7, 7], "length")
    s = _sched(budget=1)
    req = _req("c", 1, max_tokens=8)
    s.add_request(req)
    _step(s)
    assert _decode_with_draft(s, req, draft=7, sampled=[7]).num_new_tokens == 1


def test_a_draft_takes_only_blocks_no_running_request_needs():
    s = _sched(num_blocks=3, budget=512)
    a, b = _req("a", 127, max_tokens=8), _req("b", 128, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    _step(s)  # one block each; a's draft (position 128) and b's next token both need the last
    a.draft_token_ids = [3]
    out = s.schedule()
    assert s.num_preemptions == 0
    assert [(e.request.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1),
                                                                                ("b", 1)]
