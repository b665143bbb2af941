from __future__ import annotations

import json
import re

import pytest
import torch
from v4_oracle import tiny_args

import dsv4
from dsv4.checkpoint.writer import write_checkpoint
from dsv4.cli import main
from dsv4.model.config import ModelArgs
from dsv4.model.loader import build_model


def test_released_configs_load_with_every_field():
    flash, pro = ModelArgs.from_preset("v4-flash"), ModelArgs.from_preset("v4-pro")
    assert flash.compress_ratios == [0, 0] + [4, 128] * 20 + [4, 0]
    assert pro.compress_ratios == [128, 128] + [4, 128] * 29 + [4, 0]
    assert (flash.num_hash_layers, flash.expert_dtype, pro.expert_dtype) == (3, None, "fp4")
    assert flash.rope_scaling["factor"] == 16 and flash.quantization_config["fmt"] == "e4m3"
    assert len(flash.layer_ratios) == 43 and flash.mtp_ratios == [0]


@pytest.mark.parametrize("change, field", [
    ({"hidden_sizee": 4096}, "hidden_sizee"),
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"compress_ratios": [0] * 43 + [7]}, "compress_ratios"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"o_groups": 7}, "o_groups"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    # types and signs, named before the checks that combine fields (hidden_size 0 was taken,
    # num_hidden_layers -1 was blamed on num_hash_layers, a string on int())
    ({"hidden_size": 0}, "hidden_size=0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers=-1"),
    ({"head_dim": 1.5}, "head_dim=1.5"),
    ({"vocab_size": "129280"}, "vocab_size='129280'"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"compress_ratios": "abc"}, "compress_ratios='abc'"),
    ({"rope_scaling": "yarn"}, "rope_scaling='yarn'"),
])
def test_bad_config_fields_are_named(change, field):
    config = json.loads(open("tests/data/configs/deepseek-v4-flash.config.json").read())
    config.update(change)
    with pytest.raises(ValueError, match=re.escape(field)):
        ModelArgs.from_dict(config)
    with pytest.raises(ValueError, match="JSON object"):
        ModelArgs.from_dict([1, 2])


@pytest.mark.parametrize("preset, total, active", [
    ("v4-flash", 284e9, 13e9), ("v4-pro", 1.6e12, 49e9)])
def test_info_reproduces_published_parameter_counts(capsys, preset, total, active):
    assert main(["info", "--model", preset, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["total_params"] / total - 1) < 0.03
    assert abs(info["active_params"] / active - 1) < 0.03


def test_info_reproduces_the_flash_checkpoint_size(capsys):
    # the release: 46 shards, 148.66 GB (GiB, as the hub counts) with FP4 experts + FP8 linears
    main(["info", "--model", "v4-flash", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert abs(info["weight_bytes"] / 2**30 / 148.66 - 1) < 0.01
    assert info["kv_cache"]["bf16_kv_bf16_indexer"]["bytes_per_token"] == 6880
    assert info["kv_cache"]["fp8_kv_fp4_indexer"]["entry_bytes"] == 584


def test_info_table_and_errors(capsys):
    assert main(["info", "--model", "v4-pro"]) == 0
    assert "activated per token" in capsys.readouterr().out
    assert main(["info", "--model", "v4-nano"]) == 2
    assert "v4-nano" in capsys.readouterr().err


def _tiny_checkpoint(tmp_path):
    args = tiny_args()
    model = build_model(args, "cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sd = model.state_dict()
    write_checkpoint(sd, tmp_path, config=args.to_dict())
    return args, sd


def test_loader_names_missing_unexpected_and_misshaped_tensors(tmp_path):
    args, sd = _tiny_checkpoint(tmp_path / "ok")
    assert dsv4.load_model(tmp_path / "ok", device="cpu", dtype=torch.float32) is not None
    bad = dict(sd)
    del bad["layers.1.attn.indexer.wq_b.weight"]
    bad["layers.0.attn.bogus"] = torch.zeros(1)
    write_checkpoint(bad, tmp_path / "names", config=args.to_dict())
    with pytest.raises(ValueError, match=r"missing.*indexer\.wq_b.*unexpected.*bogus"):
        dsv4.load_model(tmp_path / "names", device="cpu")
    bad = dict(sd)
    bad["layers.0.attn.wkv.weight"] = torch.zeros(3, 3)
    write_checkpoint(bad, tmp_path / "shape", config=args.to_dict())
    shape_error = r"layers\.0\.attn\.wkv\.weight has shape \[3, 3\].*\[64, 64\]"
    with pytest.raises(ValueError, match=shape_error):
        dsv4.load_model(tmp_path / "shape", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dsv4.load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="preset"):
        dsv4.load_model("v4-flash")
    with pytest.raises(ValueError, match="unknown device"):
        dsv4.load_model(tmp_path / "ok", device="tpu")


def test_loaded_dtypes_follow_the_release(tmp_path):
    _tiny_checkpoint(tmp_path)
    model = dsv4.load_model(tmp_path, device="cpu", dtype=torch.bfloat16)
    sd = model.state_dict()
    assert sd["layers.0.attn.wq_a.weight"].dtype == torch.bfloat16
    assert sd["layers.0.attn_norm.weight"].dtype == torch.float32
    assert sd["layers.0.hc_attn_fn"].dtype == torch.float32
    assert sd["layers.1.ffn.gate.bias"].dtype == torch.float32
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int32
    assert model.score(torch.randint(0, 320, (1, 20))).dtype == torch.float32


def test_mtp_predicts_the_token_after_next(tmp_path):
    args, _ = _tiny_checkpoint(tmp_path)
    model = dsv4.load_model(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(2, args.vocab_size, (1, 40))
    with torch.no_grad():
        streams = model.forward_streams(ids)
        draft = model.mtp_forward(streams[:, :-1], ids[:, 1:])
        # causal: the draft at t uses streams up to t and token t+1 only
        draft_prefix = model.mtp_forward(model.forward_streams(ids[:, :21])[:, :-1], ids[:, 1:21])
    assert draft.shape == (1, 39, args.vocab_size) and draft.dtype == torch.float32
    assert torch.allclose(draft[:, :20], draft_prefix, atol=1e-5)
