from __future__ import annotations

import json

import pytest
import torch

from dsv4.checkpoint.layout import weight_format
from dsv4.checkpoint.reader import CheckpointReader, load_weight, logical_shape, read_config
from dsv4.checkpoint.writer import write_checkpoint


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "layers.0.attn.wq_a.weight": torch.randn(48, 32, generator=g),
        "layers.0.attn.attn_sink": torch.randn(4, generator=g),
        "layers.0.ffn.experts.0.w1.weight": torch.randn(16, 64, generator=g),
        "layers.0.ffn.shared_experts.w2.weight": torch.randn(32, 16, generator=g),
        "layers.0.ffn.gate.tid2eid": torch.randint(0, 4, (64, 2), generator=g, dtype=torch.int32),
        "mtp.0.e_proj.weight": torch.randn(32, 32, generator=g),
        "mtp.0.attn.wkv.weight": torch.randn(24, 32, generator=g),
    }


def test_weight_formats_follow_the_release():
    assert weight_format("layers.3.attn.wo_b.weight") == "fp8"
    assert weight_format("layers.3.attn.indexer.wq_b.weight") == "fp8"
    assert weight_format("mtp.0.h_proj.weight") == "fp8"
    assert weight_format("mtp.0.ffn.experts.7.w3.weight") == "fp4"
    assert weight_format("layers.3.attn.compressor.wkv.weight") == "as_is"
    assert weight_format("layers.3.attn.indexer.weights_proj.weight") == "as_is"
    assert weight_format("layers.3.ffn.gate.weight") == "as_is"
    assert weight_format("head.weight") == "as_is"


@pytest.mark.parametrize("num_shards", [1, 3])
def test_roundtrip_is_bit_exact(tmp_path, num_shards):
    sd = _state_dict()
    write_checkpoint(sd, tmp_path, config={"hidden_size": 32}, num_shards=num_shards)
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.keys()) == sorted(sd)
    for name, t in sd.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert read_config(tmp_path) == {"hidden_size": 32}
    if num_shards > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert files == {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
        expected = sum(t.numel() * t.element_size() for t in sd.values())
        assert index["metadata"]["total_size"] == expected


def test_quantised_checkpoint_dequantises_within_format_error(tmp_path):
    sd = _state_dict()
    write_checkpoint(sd, tmp_path, quantize="fp8", num_shards=2)
    reader = CheckpointReader(tmp_path)
    assert reader.get("layers.0.attn.wq_a.weight").dtype == torch.float8_e4m3fn
    assert reader.get("layers.0.attn.wq_a.scale").dtype == torch.float8_e8m0fnu
    assert reader.get("layers.0.ffn.experts.0.w1.weight").dtype == torch.int8
    assert logical_shape(reader, "layers.0.ffn.experts.0.w1.weight") == (16, 64)
    for name, t in sd.items():
        got = load_weight(reader, name, torch.float32)
        assert got.shape == t.shape
        fmt = weight_format(name)
        if fmt == "as_is":
            assert torch.equal(got, t.float())
        else:
            rel = 0.07 if fmt == "fp8" else 0.35
            assert (got - t).abs().max() <= rel * t.abs().max(), name


def test_reading_is_lazy(tmp_path):
    big = {"a.weight": torch.zeros(1024, 1024), "b.weight": torch.ones(2, 2)}
    write_checkpoint(big, tmp_path)
    reader = CheckpointReader(tmp_path)
    assert reader.shape("a.weight") == (1024, 1024)  # from the header, nothing loaded
    assert reader.dtype("a.weight") == "F32"
    assert torch.equal(reader.get("b.weight"), torch.ones(2, 2))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path)
    write_checkpoint(_state_dict(), tmp_path / "sharded", num_shards=2)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        CheckpointReader(tmp_path / "sharded")
    write_checkpoint(_state_dict(), tmp_path / "one")
    reader = CheckpointReader(tmp_path / "one")
    with pytest.raises(KeyError, match="layers.9"):
        reader.get("layers.9.attn.wq_a.weight")
    (tmp_path / "one" / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(tmp_path / "one")
    shard = tmp_path / "one" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # a download cut short
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        CheckpointReader(tmp_path / "one")
