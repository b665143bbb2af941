"""`bench compare` on two synthetic result files whose ratios are known by construction."""

from __future__ import annotations

import json

import pytest

from dsv4.bench.compare import compare_results, render_markdown
from dsv4.bench.metrics import compute_metrics
from dsv4.bench.records import RequestRecord
from dsv4.bench.report import build_result, load_result, print_summary, write_json
from dsv4.cli import main


def synthetic_run(label: str, num_tokens: int, ttft_s: float, itl_s: float,
                  price: float | None, num_devices: int = 8) -> dict:
    """10 requests of `num_tokens` tokens each, in a 1 s benchmark, through the real pipeline."""
    records = []
    for i in range(10):
        times = [ttft_s + k * itl_s for k in range(num_tokens)]
        records.append(RequestRecord(
            index=i, send_time_s=0.0, success=True, ttft_s=ttft_s, ttfc_s=ttft_s,
            end_s=times[-1], token_times_s=times, usage_prompt_tokens=50,
            usage_completion_tokens=num_tokens))
    metrics = compute_metrics(records, 1.0, price_per_device_hour=price, num_devices=num_devices)
    config = {"base_url": "http://x", "model": "v4-flash", "dataset": "random",
              "concurrency": 10, "request_rate": "inf", "input_len": 50,
              "output_len": num_tokens}
    return build_result(label=label, config=config, metrics=metrics, records=records,
                        warmup=[], server_models={"data": [{"id": "v4-flash"}]},
                        command_line=["dsv4", "bench", "serve"])


@pytest.fixture
def files(tmp_path):
    a = synthetic_run("8x H100", 100, 0.100, 0.020, price=2.0)  # 1000 tok/s, TPOT 20 ms
    b = synthetic_run("8x Ascend 950PR", 150, 0.080, 0.010, price=1.5)  # 1500 tok/s, 10 ms
    pa, pb = write_json(a, tmp_path / "a.json"), write_json(b, tmp_path / "b.json")
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"output_throughput_tok_s": 3000.0, "tpot_ms": 5.0,
                                "source": "dsv4 plan (synthetic)"}))
    return pa, pb, pred


def test_ratios_costs_and_bounds(files):
    pa, pb, pred = files
    a, b = load_result(pa), load_result(pb)
    b["prediction"] = json.loads(pred.read_text())
    comp = compare_results([a, b])
    run_a, run_b = comp["runs"]
    assert comp["baseline"] == "8x H100"
    assert run_b["throughput"]["output_throughput_tok_s"] == pytest.approx(1500)
    assert run_b["throughput_ratio"]["output_throughput_tok_s"] == pytest.approx(1.5)
    assert run_b["throughput_ratio"]["request_throughput_rps"] == pytest.approx(1.0)
    # total tokens: (500 + 1500) / (500 + 1000)
    assert run_b["throughput_ratio"]["total_token_throughput_tok_s"] == pytest.approx(2000 / 1500)
    assert run_a["throughput_ratio"]["output_throughput_tok_s"] == pytest.approx(1.0)
    for stat in ("mean", "median", "p90", "p99"):
        assert run_b["latency_ratio"]["ttft_ms"][stat] == pytest.approx(0.8)
        assert run_b["latency_ratio"]["tpot_ms"][stat] == pytest.approx(0.5)
        assert run_b["latency_ratio"]["itl_ms"][stat] == pytest.approx(0.5)
    # e2e: 0.08 + 149 * 0.01 = 1.57 s against 0.1 + 99 * 0.02 = 2.08 s
    assert run_b["latency_ratio"]["e2el_ms"]["median"] == pytest.approx(1.57 / 2.08)
    # cost: 16 $/h over 1000 tok/s, 12 $/h over 1500 tok/s
    cost_a = 16 / (1000 * 3600) * 1e6
    cost_b = 12 / (1500 * 3600) * 1e6
    assert run_a["cost"]["usd_per_million_output_tokens"] == pytest.approx(cost_a)
    assert run_b["cost"]["usd_per_million_output_tokens"] == pytest.approx(cost_b)
    assert run_b["cost"]["change_pct_per_million_output_tokens"] == pytest.approx(-50.0)
    assert "bound" not in run_a
    assert run_b["bound"]["throughput_fraction_of_bound"] == pytest.approx(0.5)
    assert run_b["bound"]["tpot_bound_over_measured"] == pytest.approx(0.5)


def test_markdown_report(files):
    pa, pb, _ = files
    md = render_markdown(compare_results([load_result(pa), load_result(pb)]))
    assert "baseline A = 8x H100" in md
    line = next(x for x in md.splitlines() if x.startswith("| Output throughput"))
    assert line.split("|")[2:5] == [" 1,000.00 ", " 1,500.00 ", " 1.500x "]
    line = next(x for x in md.splitlines() if x.startswith("| TPOT p99"))
    assert line.strip().endswith("0.500x |")
    assert "| change vs A (%) | 0.0 | -50.0 |" in md
    assert "hardware bound" not in md  # no prediction given
    # the synthetic runs asked for 100 and 150 output tokens: not the same workload
    assert "did not use the same workload" in md and "> - output_len: 100, 150" in md


def test_cli_compare_with_prediction(files, tmp_path, capsys):
    pa, pb, pred = files
    out, png, js = tmp_path / "r.md", tmp_path / "r.png", tmp_path / "r.json"
    rc = main(["bench", "compare", str(pa), str(pb), "--prediction", f"8x Ascend 950PR={pred}",
               "--output", str(out), "--plot", str(png), "--json", str(js)])
    assert rc == 0
    md = out.read_text()
    assert "| output throughput / bound | - | 0.500 |" in md
    assert json.loads(js.read_text())["runs"][1]["bound"]["prediction"]["tpot_ms"] == 5.0
    assert png.stat().st_size > 10_000
    rc = main(["bench", "compare", str(pa), str(pb), "--prediction", f"nobody={pred}"])
    assert rc == 2 and "matches no run" in capsys.readouterr().err


def test_compare_rejects_bad_input(files, tmp_path):
    pa, _, _ = files
    with pytest.raises(ValueError, match="at least two"):
        compare_results([load_result(pa)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a `dsv4 bench serve` result"):
        load_result(other)


def test_terminal_table_lists_failures(files, capsys):
    pa, _, _ = files
    res = load_result(pa)
    res["metrics"]["errors"] = [{"error": "HTTP 503: overloaded", "count": 3}]
    print_summary(res)
    out = capsys.readouterr().out
    assert "Output token throughput (tok/s)" in out and "1,000.00" in out
    assert "3 x HTTP 503: overloaded" in out


def test_a_planner_answer_is_a_prediction(tmp_path, capsys):
    """`dsv4 plan --json` output is read as the hardware bound, in compare's own keys."""
    from dsv4.bench.compare import load_prediction

    assert main(["plan", "--model", "v4-flash", "--hardware", "h100", "--devices", "8",
                 "--input-len", "128", "--output-len", "32", "--json"]) == 0
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(capsys.readouterr().out)
    plan = json.loads(plan_file.read_text())
    pred = load_prediction(plan_file)
    assert pred["tpot_ms"] == plan["tpot_ms_lower_bound"]
    assert pred["output_throughput_tok_s"] == pytest.approx(
        plan["decode_tokens_per_s_per_device"] * 8)
    assert "v4-flash" in pred["source"]
