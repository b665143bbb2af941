"""The bench over real HTTP against a scripted OpenAI-compatible SSE server.

TEST DOUBLE: `ScriptedServer` stands in for dsv4's own server until that lands (the e2e tests
in test_bench_e2e.py target the real one). It streams tokens on a known schedule (first token
after `ttft_s`, then one every `itl_s`), so the bench's measured TTFT / ITL / TPOT can be checked
against the script, and it reports `usage` exactly like an OpenAI server with
`stream_options.include_usage`, so the token-count path can be checked.
It runs with uvicorn on 127.0.0.1 with an ephemeral port.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")
starlette = pytest.importorskip("starlette")

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from dsv4.bench.client import Endpoint, send_request  # noqa: E402
from dsv4.bench.datasets import SampleRequest  # noqa: E402
from dsv4.cli import main  # noqa: E402


@dataclass
class Script:
    ttft_s: float = 0.06
    itl_s: float = 0.015
    reasoning_tokens: int = 0  # first N tokens go out as reasoning_content
    send_usage: bool = True
    api_key: str | None = None


class ScriptedServer:
    """Test double of an OpenAI-compatible server (see the module docstring)."""

    def __init__(self, script: Script):
        self.script = script
        self.in_flight = self.peak_in_flight = 0
        self.num_requests = 0
        self.client_ports: set[int] = set()  # one per TCP connection the bench opened
        app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/health", lambda r: JSONResponse({"ok": True})),
            Route("/v1/chat/completions", self.complete, methods=["POST"]),
            Route("/v1/completions", self.complete, methods=["POST"]),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": "scripted-tiny", "object": "model", "owned_by": "test", "root": "scripted"}]})

    async def complete(self, request: Request):
        s = self.script
        if s.api_key and request.headers.get("authorization") != f"Bearer {s.api_key}":
            return JSONResponse({"error": {"message": "bad api key", "type": "auth"}}, 401)
        self.client_ports.add(request.client.port)
        body = await request.json()
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "FAIL400" in prompt:
            return JSONResponse({"error": {"message": "prompt rejected by script",
                                           "type": "invalid_request_error"}}, 400)
        num_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        include_usage = (body.get("stream_options") or {}).get("include_usage") and s.send_usage
        prompt_tokens = len(prompt.split())
        break_after = 3 if "BREAK" in prompt else None

        async def events():
            self.num_requests += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                kind = "chat.completion.chunk" if chat else "text_completion"
                base = {"id": "x", "object": kind, "model": body["model"], "created": 0}
                if chat:  # OpenAI servers open with a role-only chunk: no token yet
                    yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                     "finish_reason": None}]})
                await asyncio.sleep(s.ttft_s)
                for i in range(num_tokens):
                    if i:
                        await asyncio.sleep(s.itl_s)
                    if break_after is not None and i == break_after:
                        raise ConnectionAbortedError("scripted mid-stream failure")
                    piece = f"t{i} "
                    if chat:
                        key = "reasoning_content" if i < s.reasoning_tokens else "content"
                        choice = {"index": 0, "delta": {key: piece}, "finish_reason": None}
                    else:
                        choice = {"index": 0, "text": piece, "finish_reason": None}
                    yield _sse({**base, "choices": [choice]})
                finish = {"index": 0, "finish_reason": "length"}
                finish.update({"delta": {}} if chat else {"text": ""})
                yield _sse({**base, "choices": [finish]})
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": {
                        "prompt_tokens": prompt_tokens, "completion_tokens": num_tokens,
                        "total_tokens": prompt_tokens + num_tokens}})
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture(scope="module")
def server():
    with ScriptedServer(Script()) as srv:
        yield srv


def bench(tmp_path: Path, url: str, *extra: str, action: str = "serve",
          name: str = "r.json") -> tuple[int, dict]:
    out = tmp_path / name
    rc = main(["bench", action, "--base-url", url, "--result-file", str(out),
               "--disable-tqdm", *extra])
    return rc, json.loads(out.read_text())


def test_measured_latencies_match_the_script(tmp_path, server):
    rc, res = bench(tmp_path, server.url, "--dataset", "random", "--input-len", "8",
                    "--output-len", "12", "--num-prompts", "6", "--concurrency", "2",
                    "--slo", "ttft_ms=1000,tpot_ms=1000", "--price-per-hour", "3",
                    "--devices", "2")
    assert rc == 0
    m, s = res["metrics"], server.script
    assert (m["completed"], m["failed"]) == (6, 0)
    # scripted: first token 60 ms after the request, then 15 ms apart (sleep can only overshoot)
    # (loose upper margins: server and client share a loaded 2-core machine and one GIL)
    assert s.ttft_s * 1000 <= m["ttft_ms"]["median"] < s.ttft_s * 1000 + 30
    assert m["itl_ms"]["median"] == pytest.approx(s.itl_s * 1000, abs=6)
    assert m["tpot_ms"]["median"] == pytest.approx(s.itl_s * 1000, abs=6)
    assert m["itl_ms"]["n"] == 6 * 11  # pooled: 11 gaps per 12-token request
    # tokens come from usage and equal what the server reported
    assert m["output_tokens_source"] == {"usage": 6}
    assert m["total_output_tokens"] == 6 * 12
    assert m["total_input_tokens"] == 6 * 8  # the double counts words; random prompts are 8
    for r in res["requests"]:
        assert r["output_tokens"] == r["usage_completion_tokens"] == 12
        assert len(r["token_times_s"]) == 12
    assert m["request_goodput_rps"] == pytest.approx(m["request_throughput_rps"])
    assert m["cost"]["usd_per_hour"] == 6
    # the JSON carries the command line, the server's model list and the client machine
    assert res["schema"] == "dsv4.bench.result/1"
    assert res["server"]["models"]["data"][0]["id"] == "scripted-tiny"
    assert res["config"]["model"] == "scripted-tiny"  # default: first model of /v1/models
    assert "--concurrency" in res["command_line"]
    assert res["client"]["python"] and res["warmup"] == {"num": 1, "failed": 0}
    assert m["max_concurrent_requests"] <= 2
    assert (tmp_path / "r.cdf.png").stat().st_size > 10_000


def test_connections_are_reused(tmp_path):
    # A response left half-read makes httpx drop its connection; the next request then pays a
    # new connect inside its TTFT. This once inflated TTFT by 10% against aiperf.
    with ScriptedServer(Script(ttft_s=0.0, itl_s=0.0)) as srv:
        rc, _ = bench(tmp_path, srv.url, "--input-len", "2", "--output-len", "3",
                      "--num-prompts", "24", "--concurrency", "3", "--no-plot")
        assert rc == 0 and srv.num_requests == 25
        assert len(srv.client_ports) <= 3


def test_completions_endpoint_and_poisson_rate(tmp_path, server):
    rc, res = bench(tmp_path, server.url, "--endpoint", "/v1/completions", "--input-len", "4",
                    "--output-len", "3", "--num-prompts", "10", "--request-rate", "40",
                    "--num-warmups", "0", "--no-plot")
    assert rc == 0 and res["metrics"]["completed"] == 10
    sends = sorted(r["send_time_s"] for r in res["requests"])
    # the last arrival is scheduled at num / rate: never sent before it; on a busy 2-core CI
    # box the event loop can be late by a few hundred ms, but not by a whole second
    assert 10 / 40 - 0.02 <= sends[-1] < 10 / 40 + 1.0
    assert res["config"]["request_rate"] == 40.0


def test_duration_mode(tmp_path, server):
    rc, res = bench(tmp_path, server.url, "--input-len", "2", "--output-len", "2",
                    "--duration", "0.4", "--concurrency", "2", "--no-plot")
    assert rc == 0
    m = res["metrics"]
    # each request takes about 60 + 15 ms; two at a time for 0.4 s
    assert 3 <= m["completed"] <= 14 and m["failed"] == 0
    # no request starts after the duration: the loop checks the clock before each dispatch, and
    # the send stamp, taken once the new task runs, trails that check by the event loop's delay
    # (0.40001 s seen on CI); a request dispatched late would start at the next free slot, ~75 ms on
    assert max(r["send_time_s"] for r in res["requests"]) < 0.4 + 0.03
    assert res["config"]["duration_s"] == 0.4 and res["config"]["num_prompts"] is None


def test_failures_are_counted_with_their_errors(tmp_path, server):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "fine one", "output_len": 4},
        {"prompt": "FAIL400 please", "output_len": 4},
        {"prompt": "BREAK midway", "output_len": 8},
        {"prompt": "fine two", "output_len": 4},
    ]))
    rc, res = bench(tmp_path, server.url, "--dataset", "jsonl", "--dataset-path", str(prompts),
                    "--num-prompts", "4", "--num-warmups", "0", "--no-plot")
    assert rc == 0  # some succeeded
    m = res["metrics"]
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 2, 2)
    by_prompt = {r["index"]: r for r in res["requests"]}
    assert by_prompt[1]["http_status"] == 400
    assert by_prompt[1]["error"] == "HTTP 400: prompt rejected by script"
    assert not by_prompt[2]["success"] and by_prompt[2]["error"]  # broken stream, reason kept
    assert len(by_prompt[2]["token_times_s"]) == 3  # what arrived before the break is kept
    assert {e["error"] for e in m["errors"]} == {by_prompt[1]["error"], by_prompt[2]["error"]}
    assert m["total_output_tokens"] == 8  # failed requests add no tokens


def test_reasoning_ttfc_and_no_usage_fallback(tmp_path):
    script = Script(ttft_s=0.03, itl_s=0.02, reasoning_tokens=4, send_usage=False)
    with ScriptedServer(script) as srv:
        rc, res = bench(tmp_path, srv.url, "--input-len", "4", "--output-len", "8",
                        "--num-prompts", "3", "--concurrency", "3", "--no-plot")
    assert rc == 0
    m = res["metrics"]
    # content starts 4 tokens (3 gaps of 20 ms... plus the 4th gap) after the first reasoning one
    gap_ms = m["ttfc_ms"]["median"] - m["ttft_ms"]["median"]
    assert gap_ms == pytest.approx(4 * 20, abs=12)
    assert m["output_tokens_source"] == {"chunks": 3}  # no usage, no tokenizer
    assert m["total_output_tokens"] == 3 * 8
    assert all(r["reasoning_text"] == "t0 t1 t2 t3 " for r in res["requests"])


def test_api_key_is_sent_and_redacted(tmp_path):
    with ScriptedServer(Script(ttft_s=0.0, itl_s=0.0, api_key="sekret")) as srv:
        rc, res = bench(tmp_path, srv.url, "--api-key", "sekret", "--input-len", "2",
                        "--output-len", "2", "--num-prompts", "2", "--no-plot")
        assert rc == 0 and res["metrics"]["completed"] == 2
        assert "sekret" not in json.dumps(res)
        rc, res = bench(tmp_path, srv.url, "--model", "m", "--input-len", "2", "--output-len",
                        "2", "--num-prompts", "2", "--no-plot", "--num-warmups", "0")
    assert rc == 1  # nothing succeeded
    assert res["metrics"]["errors"] == [{"error": "HTTP 401: bad api key", "count": 2}]


def test_sweep_then_compare(tmp_path, server, capsys):
    rc, sweep = bench(tmp_path, server.url, "--input-len", "4", "--output-len", "6",
                      "--num-prompts", "8", "--concurrency", "1,4", action="sweep",
                      name="sw.json")
    assert rc == 0
    levels = sweep["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    # the double serves requests in parallel: 4 in flight gives more throughput than 1
    assert levels[1]["output_throughput_tok_s"] > 2 * levels[0]["output_throughput_tok_s"]
    assert (tmp_path / "sw.png").stat().st_size > 10_000
    a, b = tmp_path / "sw.c1.json", tmp_path / "sw.c4.json"
    assert main(["bench", "compare", str(a), str(b), "--output", str(tmp_path / "c.md"),
                 "--plot", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")]) == 0
    report = (tmp_path / "c.md").read_text()
    assert "Output throughput (tok/s)" in report and "c=4 / A" in report
    comp = json.loads((tmp_path / "c.json").read_text())
    ratio = comp["runs"][1]["throughput_ratio"]["output_throughput_tok_s"]
    assert ratio == pytest.approx(levels[1]["output_throughput_tok_s"]
                                  / levels[0]["output_throughput_tok_s"])
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_client_reports_connection_errors():
    async def go():
        import httpx

        async with httpx.AsyncClient() as client:
            ep = Endpoint(base_url="http://127.0.0.1:9", model="m")  # discard port: refused
            return await send_request(client, ep, SampleRequest("hi", 2), 0, time.perf_counter())

    rec = asyncio.run(go())
    assert not rec.success and "ConnectError" in rec.error


def test_user_errors_are_value_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="http://"):
        Endpoint(base_url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="/v1/completions"):
        Endpoint(base_url="http://x", path="/v1/embeddings")
    rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1",
               "--disable-tqdm", "--result-file", str(tmp_path / "x.json")])
    assert rc == 2 and "--model NAME" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()  # the write check leaves nothing behind
    for action in ("serve", "sweep"):  # refused before any request is sent (port 9 is closed)
        rc = main(["bench", action, "--base-url", "http://127.0.0.1:9", "--model", "m",
                   "--concurrency", "1", "--disable-tqdm",
                   "--result-file", str(tmp_path / "no" / "dir" / "x.json")])
        assert rc == 2 and "--result-file" in capsys.readouterr().err
