"""Metric definitions on scripted streams of timestamps (no server): hand-computed values."""

from __future__ import annotations

import pytest

from dsv4.bench.client import apply_event
from dsv4.bench.metrics import compute_metrics, parse_slo, summarize_ms, tpot_s
from dsv4.bench.records import RequestRecord


def chat_chunk(content: str = "", reasoning: str = "", finish: str | None = None) -> dict:
    delta = {}
    if content:
        delta["content"] = content
    if reasoning:
        delta["reasoning_content"] = reasoning
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage(prompt: int, completion: int) -> dict:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


def scripted(index: int, events: list[tuple[float, dict]], prompt_len: int | None = None,
             kind: str = "chat") -> RequestRecord:
    """Fold (seconds after send, SSE event) pairs into a record as the client would."""
    r = RequestRecord(index=index, prompt_len=prompt_len)
    for t, ev in events:
        apply_event(r, ev, t, kind)
    r.success = not r.error and r.ttft_s is not None
    return r


@pytest.fixture
def records() -> list[RequestRecord]:
    a = scripted(0, [
        (0.0, {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}),  # no text
        (0.10, chat_chunk("a")), (0.15, chat_chunk("b")), (0.25, chat_chunk("c")),
        (0.30, chat_chunk("d")), (0.32, chat_chunk(finish="stop")), (0.33, usage(10, 4)),
    ])
    b = scripted(1, [(0.2, chat_chunk("x")), (0.3, chat_chunk("y", finish="length"))],
                 prompt_len=20)  # no usage: counted by chunks
    c = scripted(2, [(0.05, chat_chunk("z", finish="stop")), (0.06, usage(5, 1))])
    d = RequestRecord(index=3, error="HTTP 500: boom")
    c.send_time_s, b.send_time_s = 0.5, 0.1
    return [a, b, c, d]


def test_scripted_stream_fields(records):
    a = records[0]
    assert a.ttft_s == 0.10  # the role-only chunk carries no token and does not start TTFT
    assert a.end_s == 0.32  # finish chunk ends the request; the usage chunk does not
    assert a.itl_s == pytest.approx([0.05, 0.10, 0.05])
    assert (a.usage_prompt_tokens, a.usage_completion_tokens) == (10, 4)
    assert a.output_text == "abcd" and a.finish_reason == "stop"


def test_vllm_definitions_hand_computed(records):
    m = compute_metrics(records, duration_s=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["errors"] == [{"error": "HTTP 500: boom", "count": 1}]
    assert m["output_tokens_source"] == {"usage": 2, "chunks": 1}
    assert m["total_output_tokens"] == 4 + 2 + 1
    assert m["total_input_tokens"] == 10 + 20 + 5  # usage first, dataset count otherwise
    assert m["request_throughput_rps"] == pytest.approx(1.5)
    assert m["output_throughput_tok_s"] == pytest.approx(3.5)
    assert m["total_token_throughput_tok_s"] == pytest.approx(21.0)
    # TTFT over [100, 200, 50] ms; numpy linear percentiles: p90 = 100 + 0.8 * 100
    assert m["ttft_ms"]["mean"] == pytest.approx(350 / 3)
    assert m["ttft_ms"]["median"] == pytest.approx(100)
    assert m["ttft_ms"]["p90"] == pytest.approx(180)
    assert m["ttft_ms"]["p99"] == pytest.approx(198)
    # TPOT = (E2E - TTFT) / (n - 1): a = 220/3 ms, b = 100 ms; c has one token and is left out
    assert m["tpot_ms"]["n"] == 2
    assert m["tpot_ms"]["mean"] == pytest.approx((220 / 3 + 100) / 2)
    # ITL pooled over chunk gaps of all requests: [50, 100, 50] + [100]
    assert m["itl_ms"]["n"] == 4
    assert m["itl_ms"]["mean"] == pytest.approx(75)
    assert m["itl_ms"]["median"] == pytest.approx(75)
    assert m["e2el_ms"]["median"] == pytest.approx(300)
    assert m["e2el_ms"]["mean"] == pytest.approx((320 + 300 + 50) / 3)
    assert m["request_goodput_rps"] is None  # no SLO given


def test_goodput_uses_vllm_rule(records):
    m = compute_metrics(records, 2.0, slo_ms=parse_slo("ttft_ms=150,tpot_ms=80"))
    # a: ttft 100, tpot 73.3 -> good; b: ttft 200 -> bad; c: one token, tpot counts as 0 -> good
    assert m["num_good_requests"] == 2
    assert m["request_goodput_rps"] == pytest.approx(1.0)
    assert parse_slo("ttft:150 tpot:80") == parse_slo("ttft_ms=150,tpot_ms=80")  # vLLM style
    m = compute_metrics(records, 2.0, slo_ms=parse_slo("e2el_ms=310"))
    assert m["num_good_requests"] == 2  # 300 and 50 ms, not 320 ms


def test_cost_per_million_tokens(records):
    m = compute_metrics(records, 2.0, price_per_device_hour=2.0, num_devices=4)
    # 8 $/h over 3.5 output tok/s = 12 600 tok/h
    assert m["cost"]["usd_per_hour"] == 8.0
    assert m["cost"]["usd_per_million_output_tokens"] == pytest.approx(8 / 12600 * 1e6)
    assert m["cost"]["usd_per_million_total_tokens"] == pytest.approx(8 / (21 * 3600) * 1e6)


def test_time_to_first_content_excludes_reasoning():
    r = scripted(0, [(0.1, chat_chunk(reasoning="let")), (0.2, chat_chunk(reasoning="me")),
                     (0.35, chat_chunk("42")), (0.4, chat_chunk(finish="stop")),
                     (0.41, usage(3, 3))])
    assert (r.ttft_s, r.ttfc_s) == (0.1, 0.35)
    assert r.reasoning_text == "letme" and r.output_text == "42"
    m = compute_metrics([r], 1.0)
    assert m["ttft_ms"]["median"] == pytest.approx(100)
    assert m["ttfc_ms"]["median"] == pytest.approx(350)
    assert m["tpot_ms"]["median"] == pytest.approx((400 - 100) / 2)


def test_completions_stream_and_tokenizer_fallback():
    ev = [(0.1, {"choices": [{"text": "hello world", "finish_reason": None}]}),
          (0.3, {"choices": [{"text": " again", "finish_reason": "length"}]})]
    r = scripted(0, ev, kind="completions")
    m = compute_metrics([r], 1.0, count_tokens=lambda s: len(s.split()))
    assert r.output_tokens == 3 and r.output_tokens_source == "tokenizer"
    assert m["tpot_ms"]["median"] == pytest.approx(100)  # (300 - 100) / (3 - 1)


def test_stream_error_event_fails_request():
    r = scripted(0, [(0.1, chat_chunk("a")), (0.2, {"error": {"message": "engine died"}})])
    assert not r.success and "engine died" in r.error
    m = compute_metrics([r], 1.0)
    assert m["failed"] == 1 and m["completed"] == 0
    assert m["ttft_ms"]["mean"] is None  # no successful request: no latency, not a fake 0


def test_summaries_and_tpot_edge_cases():
    assert summarize_ms([])["n"] == 0
    assert summarize_ms([0.001, 0.003])["median"] == pytest.approx(2.0)
    r = RequestRecord(index=0, ttft_s=0.1, end_s=0.1, output_tokens=1)
    assert tpot_s(r) is None
    with pytest.raises(ValueError, match="ttft_ms=500"):
        parse_slo("latency=5")
    with pytest.raises(ValueError, match="not a number"):
        parse_slo("ttft_ms=fast")
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([], 0.0)


def test_max_concurrency_from_intervals():
    recs = []
    for i, (send, e2e) in enumerate([(0.0, 1.0), (0.5, 1.0), (1.0, 0.2), (1.6, 0.1)]):
        recs.append(RequestRecord(index=i, send_time_s=send, end_s=e2e, ttft_s=e2e / 2,
                                  token_times_s=[e2e / 2], success=True))
    # [0,1) [0.5,1.5) [1,1.2) [1.6,1.7): at most two overlap; an end frees its slot first
    assert compute_metrics(recs, 2.0)["max_concurrent_requests"] == 2
