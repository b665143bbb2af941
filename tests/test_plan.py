"""The planner against published figures, and its predictions against published measurements
(a bound must sit on the right side of every measurement)."""

from __future__ import annotations

import json

import pytest

from dsv4.cli import main
from dsv4.plan.hardware import get_hardware, load_catalogue
from dsv4.plan.models import ModelSpec
from dsv4.plan.predict import Deployment, predict

GiB = 2**30
MILLION = 2**20  # "1M tokens" in the published KV figures


@pytest.mark.parametrize("model, gib", [("v4-pro", 9.62), ("v4-flash", 6.72), ("v3.2", 83.9)])
def test_kv_cache_for_a_1m_token_sequence_matches_published_figures(model, gib):
    # vLLM's V4 blog: 9.62 GiB (V4-Pro) vs 83.9 GiB (V3.2) in bf16; V4_SPEC for Flash
    spec = ModelSpec.from_name(model)
    assert abs(spec.kv_bytes_per_token() * MILLION / GiB / gib - 1) < 0.01
    assert abs(spec.kv_bytes_per_sequence(MILLION) / GiB / gib - 1) < 0.01  # window included


def test_kv_bytes_by_layer_type():
    pro = ModelSpec.from_name("v4-pro").kv_bytes_per_token_by_layer_type()
    assert pro == {"hca": 31 * 8, "csa": 30 * 320}
    fp8 = ModelSpec.from_name("v4-pro").kv_bytes_per_token_by_layer_type("fp8", "fp4")
    assert fp8["csa"] == 30 * (584 + 68) / 4


@pytest.mark.parametrize("model, total, active", [
    ("v4-pro", 1.6e12, 49e9), ("v4-flash", 284e9, 13e9), ("v3", 671e9, 37e9)])
def test_parameter_counts_match_published_figures(model, total, active):
    spec = ModelSpec.from_name(model)
    assert abs(spec.total_params / total - 1) < 0.03
    assert abs(spec.active_params / active - 1) < 0.03


def test_analytic_counts_equal_the_model_built_on_the_meta_device():
    from dsv4.model.config import ModelArgs
    from dsv4.model.info import describe

    for preset in ("v4-flash", "v4-pro"):
        info, spec = describe(ModelArgs.from_preset(preset)), ModelSpec.from_name(preset)
        assert info["total_params"] == pytest.approx(spec.total_params, rel=1e-4)
        assert info["active_params"] == pytest.approx(spec.active_params, rel=1e-4)
        assert info["mtp_params"] == pytest.approx(spec.mtp_params, rel=1e-6)


def test_release_checkpoint_sizes():
    # Flash: 148.66 GB on the hub (GiB); Pro: about 865 GB
    assert ModelSpec.from_name("v4-flash").weight_bytes("fp4-fp8") / GiB == pytest.approx(148.66, rel=0.01)
    assert ModelSpec.from_name("v4-pro").weight_bytes("fp4-fp8") / 1e9 == pytest.approx(865, rel=0.01)


def test_v4_pro_needs_27_percent_of_v32_flops_at_1m_context():
    ratio = ModelSpec.from_name("v4-pro").flops_per_token(MILLION) / \
        ModelSpec.from_name("v3.2").flops_per_token(MILLION)
    assert abs(ratio - 0.27) < 0.05


def test_decode_ceiling_is_above_sglang_v4_flash_on_h200():
    # LMSYS / SGLang day-0 V4 post: 266 tok/s per request for V4-Flash on H200 at 4K context
    r = predict(Deployment(ModelSpec.from_name("v4-flash"), get_hardware("h200"), devices=4,
                           tp=4, context=4096, input_len=3072, output_len=1024,
                           concurrency=1, kv_dtype="fp8",
                           indexer_dtype="fp4"))
    assert r["decode_tokens_per_s_per_sequence"] > 266
    assert r["tpot_ms_lower_bound"] < 1000 / 266


def test_per_npu_ceiling_is_above_cloudmatrix384_for_r1_on_910c():
    # CloudMatrix384 (arXiv 2506.12708): DeepSeek-R1 INT8, 1943 decode tok/s per 910C at
    # TPOT < 50 ms with ~96 sequences per die, and 6688 prefill tok/s per 910C
    r = predict(Deployment(ModelSpec.from_name("v3"), get_hardware("ascend-910c"), devices=160,
                           context=4096, input_len=3072, output_len=1024,
                           concurrency=160 * 192, kv_dtype="fp8"))
    assert r["storage_plan"] == "int8"
    assert r["decode_tokens_per_s_per_device"] > 1943
    assert r["tpot_ms_lower_bound"] < 50
    assert r["prefill_tokens_per_s_per_device"] > 6688


def test_does_not_fit_says_why():
    r = predict(Deployment(ModelSpec.from_name("v4-pro"), get_hardware("h100"), devices=8))
    assert not r["fits"] and "exceed usable memory" in r["why_not"][0]
    r = predict(Deployment(ModelSpec.from_name("v3"), get_hardware("h200"), devices=8,
                           context=1_048_576, kv_dtype="bf16"))
    assert r["fits"] and r["max_concurrent_sequences"] < 10


def test_cli_json_has_the_documented_keys(capsys):
    assert main(["plan", "--model", "v4-flash", "--hardware", "h200", "--devices", "4",
                 "--context", "65536", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("kv_cache_bytes_per_token", "kv_cache_bytes_per_sequence", "total_params",
                "active_params", "fits", "max_concurrent_sequences",
                "decode_tokens_per_s_per_device", "tpot_ms_lower_bound",
                "cost_per_million_output_tokens", "utilization", "devices", "context"):
        assert key in out, key


def test_cli_compare_table(capsys):
    assert main(["plan", "compare", "--model", "v4-flash", "--hardware", "h100",
                 "--hardware", "ascend-950pr"]) == 0
    out = capsys.readouterr().out
    assert "8 x h100" in out and "8 x ascend-950pr" in out
    assert "ascend-950pr vs h100: decode throughput per device" in out


def test_cli_sweep_writes_a_png(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert main(["plan", "--hardware", "h200", "--hardware", "b200", "--sweep", "concurrency",
                 "--context", "131072", "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_hardware_file_extends_the_catalogue(tmp_path):
    extra = {"my-gpu": {"name": "Mine", "memory_gb": 96, "memory_bandwidth_tbps": 2.0,
                        "tflops": {"bf16": 400}, "interconnect_gbps": 100,
                        "price_per_hour_usd": 1.0, "source": "my lab", "figure_kind": "reported"}}
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(extra))
    catalogue = load_catalogue(path)
    assert "my-gpu" in catalogue and "h100" in catalogue
    assert catalogue["my-gpu"].storage_plan == "bf16"


def test_bad_input_names_the_problem(capsys):
    with pytest.raises(ValueError, match="unknown hardware 'h300'.*h100"):
        get_hardware("h300")
    assert main(["plan", "--model", "v9"]) == 2
    assert "unknown model 'v9'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="multiple of --tp"):
        Deployment(ModelSpec.from_name("v4-flash"), get_hardware("h100"), devices=8, tp=3)
    # impossible deployments printed numbers: a prompt longer than the sequence, a price < 0
    assert main(["plan", "--input-len", "2000000", "--context", "4096"]) == 2
    assert "must fit the context (4096" in capsys.readouterr().err
    assert main(["plan", "--price-per-hour", "-5"]) == 2
    assert "price per hour" in capsys.readouterr().err
    assert all(hw.source and hw.figure_kind in ("official", "reported")
               for hw in load_catalogue().values())


def test_plan_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, dsv4.cli; dsv4.cli.main(['plan', '--json']); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
