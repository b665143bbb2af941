"""End to end: `dsv4 bench` against dsv4's own server serving dsv4-tiny on 127.0.0.1.

These light up once the server lands (`serve` registered in dsv4.cli.SUBCOMMANDS and its module
importable); until then every test here skips with that reason. The one seam to adjust if the
server's flags differ is `start_dsv4_server`.
"""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv4.cli import SUBCOMMANDS, main


def server_missing_reason() -> str | None:
    if "serve" not in SUBCOMMANDS:
        return "dsv4's server has not landed yet: no `serve` subcommand in dsv4.cli"
    try:
        importlib.import_module(SUBCOMMANDS["serve"][0])
    except ImportError as exc:
        return f"dsv4's server module {SUBCOMMANDS['serve'][0]} is not importable: {exc}"
    bundled = Path(__file__).resolve().parent.parent / "dsv4" / "assets" / "dsv4-tiny"
    if not (bundled / "config.json").is_file():
        return f"the bundled dsv4-tiny model has not been trained yet (no {bundled}/config.json)"
    return None


pytestmark = pytest.mark.skipif(server_missing_reason() is not None,
                                reason=server_missing_reason() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dsv4_server(log_path: Path, timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """`dsv4 serve` (bundled dsv4-tiny) on a free loopback port; returns once /health is 200."""
    import httpx

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv4.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dsv4 serve exited with {proc.returncode}:\n"
                               + log_path.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"dsv4 serve did not answer /health in {timeout_s} s:\n"
                       + log_path.read_text()[-3000:])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start_dsv4_server(tmp_path_factory.mktemp("server") / "serve.log")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench(tmp_path: Path, url: str, *extra: str, action: str = "serve",
          name: str = "r.json") -> dict:
    out = tmp_path / name
    rc = main(["bench", action, "--base-url", url, "--result-file", str(out), "--disable-tqdm",
               "--no-plot", "--input-len", "16", "--output-len", "8", "--ignore-eos",
               "--extra-body", '{"temperature": 0}', *extra])
    assert rc == 0
    return json.loads(out.read_text())


def check_result(res: dict, num: int) -> None:
    m = res["metrics"]
    assert (m["completed"], m["failed"]) == (num, 0), m["errors"]
    assert m["output_tokens_source"] == {"usage": num}  # the server sends usage
    for r in res["requests"]:
        assert r["output_tokens"] == r["usage_completion_tokens"]
        assert 1 <= r["output_tokens"] <= 8
        assert r["usage_prompt_tokens"] >= 1
    assert m["total_output_tokens"] == sum(r["usage_completion_tokens"] for r in res["requests"])
    assert m["ttft_ms"]["median"] > 0 and m["e2el_ms"]["median"] >= m["ttft_ms"]["median"]
    assert res["server"]["models"]["data"], "the server's /v1/models answer is stored"


def test_fixed_concurrency_usage_matches_official_client(tmp_path, server):
    openai = pytest.importorskip("openai")
    from dsv4.bench.datasets import load_requests

    res = bench(tmp_path, server, "--num-prompts", "6", "--concurrency", "2", "--seed", "3")
    check_result(res, 6)
    # prompt token counts: the bench's streamed usage equals what the official client gets
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    prompts = load_requests("random", 6, input_len=16, output_len=8, seed=3)
    for rec, sample in zip(res["requests"][:2], prompts[:2]):
        answer = client.chat.completions.create(
            model=res["config"]["model"], max_tokens=1,
            messages=[{"role": "user", "content": sample.prompt}])
        assert answer.usage.prompt_tokens == rec["usage_prompt_tokens"]


def test_poisson_rate_and_completions(tmp_path, server):
    res = bench(tmp_path, server, "--num-prompts", "6", "--request-rate", "4",
                "--endpoint", "/v1/completions")
    check_result(res, 6)
    assert max(r["send_time_s"] for r in res["requests"]) == pytest.approx(1.5, abs=0.3)


def test_sweep_and_compare(tmp_path, server):
    sweep = bench(tmp_path, server, "--num-prompts", "4", "--concurrency", "1,2",
                  action="sweep", name="sw.json")
    assert [lv["concurrency"] for lv in sweep["levels"]] == [1, 2]
    for run in sweep["runs"]:
        check_result(run, 4)
    out = tmp_path / "cmp.md"
    assert main(["bench", "compare", str(tmp_path / "sw.c1.json"), str(tmp_path / "sw.c2.json"),
                 "--output", str(out)]) == 0
    assert "Output throughput (tok/s)" in out.read_text()
