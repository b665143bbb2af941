"""The engine over dsv4's own V4 model (V4ModelRunner) against the model alone and against
transformers: continuous batching, chunked prefill and preemption change nothing."""

from __future__ import annotations

import pytest
import torch
from v4_oracle import hf_model, released_state_dict, tiny_args

import dsv4
from dsv4.checkpoint.writer import write_checkpoint
from dsv4.engine.llm import LLM
from dsv4.engine.sampling_params import SamplingParams

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    args = tiny_args()
    hf = hf_model(args)
    path = tmp_path_factory.mktemp("v4")
    write_checkpoint(released_state_dict(hf, args), path, config=args.to_dict())
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (32,), generator=g).tolist()
    prompts = [torch.randint(2, args.vocab_size, (n,), generator=g).tolist() for n in lengths]
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32, kv_cache_dtype="auto",
                            indexer_cache_dtype="auto")
    alone = [model.generate(torch.tensor([p]), MAX_TOKENS)[0, len(p):].tolist() for p in prompts]
    return path, hf, prompts, alone


def _run(path, prompts, **engine_kwargs):
    kwargs = dict(device="cpu", dtype="fp32", max_num_seqs=32, max_num_batched_tokens=256,
                  kv_cache_memory_bytes=64 << 20)
    kwargs.update(engine_kwargs)
    llm = LLM(model=str(path), **kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    return llm, llm.generate(prompts, params)


def test_32_ragged_requests_together_equal_each_alone_and_transformers(checkpoint):
    path, hf, prompts, alone = checkpoint
    _, outs = _run(path, prompts)
    assert [o.token_ids for o in outs] == alone
    for p, ref in list(zip(prompts, alone))[:6]:  # the oracle is slow; a sample suffices
        with torch.no_grad():
            hf_out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert hf_out[0, len(p):].tolist() == ref


@pytest.mark.parametrize("budget", [3, 5, 64, 127])
def test_chunked_prefill_of_any_size_changes_nothing(checkpoint, budget):
    path, _, prompts, alone = checkpoint
    picked = [0, 5, 9]  # prompts long enough to be cut in many chunks
    _, outs = _run(path, [prompts[i] for i in picked], max_num_batched_tokens=budget)
    assert [o.token_ids for o in outs] == [alone[i] for i in picked]
    _, whole = _run(path, [prompts[i] for i in picked], max_num_batched_tokens=512)
    for a, b in zip(outs, whole):  # the sampled tokens' logprobs agree too
        got = [step.logprob for step in a.logprobs]
        ref = [step.logprob for step in b.logprobs]
        assert got == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("factor", [0, 10**9])  # always gather each query's top-k / never
def test_csa_gathered_top_k_and_masked_entries_give_the_same_outputs(checkpoint, monkeypatch,
                                                                     factor):
    """Past GATHER_TOPK_FACTOR x index_topk compressed entries the runner gathers each
    query's top-k instead of masking all entries; either way is the same attention."""
    from dsv4.engine import model_runner

    monkeypatch.setattr(model_runner, "GATHER_TOPK_FACTOR", factor)
    path, _, prompts, alone = checkpoint
    picked = [i for i, p in enumerate(prompts) if len(p) > 200][:3]  # 50+ entries, top-k 6
    _, outs = _run(path, [prompts[i] for i in picked], max_num_batched_tokens=64)
    assert [o.token_ids for o in outs] == [alone[i] for i in picked]


def test_indexer_in_the_smallest_chunks_gives_the_same_outputs(checkpoint, monkeypatch):
    """Over a long context the indexer scores chunks of query blocks and takes the top-k of
    chunks of rows (INDEX_CHUNK_BYTES); one block and one row a chunk must pick what one
    chunk of everything does."""
    from dsv4.engine import model_runner

    monkeypatch.setattr(model_runner, "INDEX_CHUNK_BYTES", 1)
    path, _, prompts, alone = checkpoint
    picked = [i for i, p in enumerate(prompts) if len(p) > 200][:2]
    _, outs = _run(path, [prompts[i] for i in picked], max_num_batched_tokens=256)
    assert [o.token_ids for o in outs] == [alone[i] for i in picked]


@pytest.mark.parametrize("decode_graph", [False, True])
def test_preemption_under_a_small_cache_gives_the_same_outputs(checkpoint, decode_graph):
    """decode_graph: plain decode steps through engine/decode_graph.py (run eagerly, as the
    compiled graphs run the same code), which must find a recomputed request's rings, state
    slots and blocks where the general path put them."""
    from dsv4.engine.decode_graph import DecodeGraph
    from dsv4.engine.kv_cache import CacheSpec, KVCacheLayout
    from dsv4.engine.model_runner import V4ModelRunner

    path, _, prompts, alone = checkpoint
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32, kv_cache_dtype="auto",
                            indexer_cache_dtype="auto")
    # 8 running requests but only 10 blocks of 128 tokens: they cannot all grow
    layout = KVCacheLayout(CacheSpec.from_config(model.args), block_size=128, num_blocks=10,
                           num_state_slots=8)
    runner = V4ModelRunner(model, layout, max_model_len=512)
    if decode_graph:
        runner.decode_graph = DecodeGraph(model, runner.pools, layout.block_size, runner.fp8)
    llm = LLM(runner=runner, max_num_seqs=8, max_num_batched_tokens=256)
    picked = list(range(16))
    outs = llm.generate([prompts[i] for i in picked],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [alone[i] for i in picked]
