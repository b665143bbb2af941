"""dsv4's V4 model against `transformers.DeepseekV4ForCausalLM` (the oracle), on tiny random
configurations written in the released checkpoint layout and loaded with `dsv4.load_model`."""

from __future__ import annotations

import pytest
import torch
from v4_oracle import hf_model, released_state_dict, tiny_args

import dsv4
from dsv4.checkpoint.writer import write_checkpoint

# Every layer type, hash and scored MoE, the MTP layer; window, ratio-4 and ratio-128
# boundaries are all crossed by 260-token prompts.
CONFIGS = {
    "window16": dict(),
    "window128_two_hash": dict(sliding_window=128, num_hidden_layers=5, num_hash_layers=2,
                              compress_ratios=[128, 4, 0, 4, 128, 0], index_topk=16),
}
PROMPT_LEN = 260


def _write(tmp_path, name, quantize="none", num_shards=1, **overrides):
    args = tiny_args(**overrides)
    hf = hf_model(args)
    sd = released_state_dict(hf, args)
    config = args.to_dict()
    if quantize == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                         "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    path = write_checkpoint(sd, tmp_path / name, config=config, quantize=quantize,
                            num_shards=num_shards)
    return args, hf, path


def _prompt(args, batch=1, length=PROMPT_LEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, args.vocab_size, (batch, length), generator=g)


def _assert_close(ours, ref):
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err < 1e-3, f"max error {err:.2e} relative to the largest logit"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    args, hf, path = _write(tmp_path, name, num_shards=1 if name == "window16" else 3,
                            **CONFIGS[name])
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32,
                            kv_cache_dtype="auto", indexer_cache_dtype="auto")
    ids = _prompt(args, batch=2)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    _assert_close(model.score(ids), ref)


def test_generate_matches_transformers_greedy(tmp_path):
    args, hf, path = _write(tmp_path, "gen")
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32,
                            kv_cache_dtype="auto", indexer_cache_dtype="auto")
    ids = _prompt(args, length=250)
    ours = model.generate(ids, max_new_tokens=40)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert ours.shape == (1, 290)
    assert torch.equal(ours, ref)


def test_fused_projections_keep_the_logits_and_the_weights(tmp_path):
    """The engine's inference layout (`Transformer.fuse_projections`: products sharing an
    input as one, the routed experts stacked) changes no weight and no logit beyond rounding,
    and in float32 allocates nothing: every fused Linear views the fused tensor (the CPU
    kernels' packed copies are for bf16)."""
    args, hf, path = _write(tmp_path, "fused")
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32,
                            kv_cache_dtype="auto", indexer_cache_dtype="auto")
    ids = _prompt(args, batch=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model.score(ids)
    model.fuse_projections()
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    attn, ffn = model.layers[1].attn, model.layers[1].ffn  # a CSA layer: every fusion
    assert attn.wkv.weight.data_ptr() == attn._wq_a_kv[args.q_lora_rank:].data_ptr()
    comp = attn.indexer.compressor
    assert comp.wgate.weight.data_ptr() == comp._kv_gate[comp.wkv.weight.shape[0]:].data_ptr()
    assert ffn.shared_experts.w3.weight.data_ptr() == \
        ffn.shared_experts._w13[args.moe_intermediate_size:].data_ptr()
    assert ffn.experts[2].w3.weight.data_ptr() == \
        ffn._w13[2, :, args.moe_intermediate_size:].data_ptr()
    fused = model.score(ids)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        _assert_close(fused, hf(ids).logits.float())


def test_quantised_checkpoint_matches_oracle_with_dequantised_weights(tmp_path):
    """FP8 linears + FP4 experts on disk; the oracle gets the same dequantised weights."""
    args, hf, path = _write(tmp_path, "fp8", quantize="fp8", num_shards=2)
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32,
                            kv_cache_dtype="auto", indexer_cache_dtype="auto")
    # push the dequantised weights back into the oracle
    from dsv4.checkpoint.reader import CheckpointReader, load_weight

    reader = CheckpointReader(path)
    ours_sd = {k: load_weight(reader, k, torch.float32) for k in model.state_dict()
               if not k.startswith("mtp.") and model.state_dict()[k].is_floating_point()}
    inter = args.moe_intermediate_size
    with torch.no_grad():
        for layer_id, layer in enumerate(hf.model.layers):
            p = f"layers.{layer_id}."
            attn = layer.self_attn
            for hf_mod, ours in ((attn.q_a_proj, "attn.wq_a"), (attn.q_b_proj, "attn.wq_b"),
                                 (attn.kv_proj, "attn.wkv"), (attn.o_a_proj, "attn.wo_a"),
                                 (attn.o_b_proj, "attn.wo_b")):
                hf_mod.weight.copy_(ours_sd[p + ours + ".weight"])
            if attn.compressor is not None and hasattr(attn.compressor, "indexer"):
                attn.compressor.indexer.q_b_proj.weight.copy_(
                    ours_sd[p + "attn.indexer.wq_b.weight"])
            mlp = layer.mlp
            mlp.shared_experts.gate_proj.weight.copy_(ours_sd[p + "ffn.shared_experts.w1.weight"])
            mlp.shared_experts.up_proj.weight.copy_(ours_sd[p + "ffn.shared_experts.w3.weight"])
            mlp.shared_experts.down_proj.weight.copy_(ours_sd[p + "ffn.shared_experts.w2.weight"])
            for e in range(args.n_routed_experts):
                q = f"{p}ffn.experts.{e}."
                mlp.experts.gate_up_proj[e, :inter].copy_(ours_sd[q + "w1.weight"])
                mlp.experts.gate_up_proj[e, inter:].copy_(ours_sd[q + "w3.weight"])
                mlp.experts.down_proj[e].copy_(ours_sd[q + "w2.weight"])
    ids = _prompt(args)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    _assert_close(model.score(ids), ref)


def test_prefill_then_decode_equals_full_forward(tmp_path):
    args, _, path = _write(tmp_path, "cache")
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32,
                            kv_cache_dtype="auto", indexer_cache_dtype="auto")
    ids = _prompt(args, length=270)
    full = model.score(ids)
    cache = model.new_cache()
    with torch.no_grad():
        pieces = [model(ids[:, :130], cache)]  # crosses the 128 boundary inside prefill
        pieces += [model(ids[:, t:t + 1], cache) for t in range(130, 270)]
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-4, rtol=0)


def test_fp8_kv_changes_attention_only_by_fp8_rounding(tmp_path):
    # head_dim 80 = 64 non-RoPE dims (one FP8 block) + 16 RoPE dims
    args, _, path = _write(tmp_path, "qat", sliding_window=128, head_dim=80)
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32, kv_cache_dtype="auto",
                            indexer_cache_dtype="auto")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 260, args.hidden_size, generator=g)
    positions = torch.arange(260)
    with torch.no_grad():
        for layer in model.layers:
            freq = model._inv_freq(layer.ratio)
            exact = layer.attn(x, positions, freq, None, False, False)
            fp8 = layer.attn(x, positions, freq, None, True, False)
            rel = ((fp8 - exact).norm() / exact.norm()).item()
            # e4m3 keeps 3 mantissa bits: a few percent of relative error, not zero, not more
            assert 0.005 < rel < 0.06, (layer.layer_id, rel)


def test_fp4_indexer_only_changes_which_entries_are_picked(tmp_path):
    # with top-k above the number of entries every visible entry is kept, so quantising the
    # indexer's q and k (which only rank entries) must change nothing at all
    args, _, path = _write(tmp_path, "fp4", index_topk=128)
    exact = dsv4.load_model(path, device="cpu", dtype=torch.float32, kv_cache_dtype="auto",
                            indexer_cache_dtype="auto")
    fp4 = dsv4.load_model(path, device="cpu", dtype=torch.float32, kv_cache_dtype="auto",
                          indexer_cache_dtype="fp4")
    ids = _prompt(args)
    assert torch.allclose(fp4.score(ids), exact.score(ids), atol=1e-5, rtol=0)


def test_quantised_kv_decode_equals_its_own_full_forward(tmp_path):
    args, _, path = _write(tmp_path, "qdec", head_dim=80)
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32, kv_cache_dtype="fp8",
                            indexer_cache_dtype="fp4")
    ids = _prompt(args)
    full = model.score(ids)
    cache = model.new_cache()
    with torch.no_grad():
        pieces = [model(ids[:, :200], cache)]
        pieces += [model(ids[:, t:t + 1], cache) for t in range(200, 260)]
    # an fp32 input one ulp away can round to the neighbouring e4m3 value, so allow a little
    # more than fp32 noise, far less than one FP8 step on every element would cause
    err = (torch.cat(pieces, 1) - full).abs().max() / full.abs().max()
    assert err < 2e-3


def test_fp8_cache_stores_584_byte_entries_at_released_dims():
    from v4_oracle import tiny_args as _args

    from dsv4.model.loader import build_model

    args = _args(head_dim=512, qk_rope_head_dim=64, index_head_dim=64, hidden_size=32,
                 num_attention_heads=2, o_groups=2, num_hidden_layers=2,
                 compress_ratios=[4, 128, 0], vocab_size=64)
    model = build_model(args, "cpu", kv_cache_dtype="fp8")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 140)), cache)
    assert cache.layers[0].window.dtype == torch.uint8
    assert cache.layers[0].window.shape == (1, args.sliding_window, 584)
    assert cache.layers[0].compressed.shape == (1, 35, 584)  # 140 tokens / ratio 4
    assert cache.layers[1].compressed.shape == (1, 1, 584)  # one closed 128-token window
