"""LLMEngine end to end: scheduling + sampling + detokenisation around a real V4 network.

The network is `transformers`' DeepSeek-V4 (the project's oracle) on a tiny random config.
`RecomputeRunner` is a test double for the paged runner (whose model code lives on another
branch): it satisfies the ModelRunner contract by recomputing each sampling request's whole
sequence without a cache. It checks everything the engine itself does (batching, chunking,
preemption, sampling, stop handling, streaming); the paged runner's own cache correctness is
tested where it is written.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dsv4.engine.batch import RaggedBatch
from dsv4.engine.kv_cache import CacheSpec, KVCacheLayout
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.runner import ModelRunner
from dsv4.engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

VOCAB = 256


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.DeepseekV4Config(
        vocab_size=VOCAB,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=64,
        q_lora_rank=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        o_groups=2,
        o_lora_rank=32,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=4,
        sliding_window=8,
        compress_ratios=[0, 4, 128, 4],
        num_hash_layers=1,
        qk_rope_head_dim=16,
        max_position_embeddings=4096,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    return model


class RecomputeRunner(ModelRunner):
    """Test double for the paged runner: full recompute per sampling request (see module doc)."""

    def __init__(self, model, layout: KVCacheLayout) -> None:
        self.model = model
        self.layout = layout
        self.vocab_size = VOCAB
        self.eos_token_id = 1
        self.batches: list[RaggedBatch] = []

    @torch.no_grad()
    def execute_model(self, batch: RaggedBatch) -> torch.Tensor:
        self.batches.append(batch)
        # the batch must carry exactly the tokens the requests have at those positions
        for i, s in enumerate(batch.scheduled):
            lo, hi = batch.query_start_loc[i], batch.query_start_loc[i + 1]
            assert batch.input_ids[lo:hi].tolist() == s.token_ids
        rows = []
        for i, s in enumerate(batch.scheduled):
            if s.samples:
                ids = s.request.all_token_ids[: int(batch.seq_lens[i])]
                rows.append(self.model(torch.tensor([ids])).logits[0, -1].float())
        return torch.stack(rows) if rows else torch.empty(0, VOCAB)


class CharTokenizer:
    """Test double for a tokenizer over the tiny model's 256 ids: each id is one printable
    ASCII character (many ids share one), so any output decodes to text."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i % 95) for i in ids)


SPEC = CacheSpec(
    num_hidden_layers=4,
    compress_ratios=(0, 4, 128, 4),
    sliding_window=8,
    head_dim=64,
    qk_rope_head_dim=16,
    index_head_dim=32,
)


def _engine(model, num_blocks=64, slots=64, budget=256, max_num_seqs=64, tokenizer=None):
    layout = KVCacheLayout(SPEC, block_size=128, num_blocks=num_blocks, num_state_slots=slots)
    return LLMEngine(
        RecomputeRunner(model, layout),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=2048,
        tokenizer=tokenizer,
    )


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 60, (n,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (L,), generator=g).tolist() for L in lens]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_batched_greedy_equals_alone_and_transformers_generate(hf_model):
    prompts = _prompts(32)
    together = _engine(hf_model, budget=96).generate(prompts, GREEDY)
    for p, out in zip(prompts[:6], together[:6]):
        alone = _engine(hf_model).generate([p], GREEDY)[0]
        assert out.token_ids == alone.token_ids
    for p, out in zip(prompts, together):
        assert out.token_ids == _hf_greedy(hf_model, p, 6)
        assert out.finish_reason == "length"


@pytest.mark.parametrize("budget", [1, 3, 5, 64, 127])
def test_chunked_prefill_any_chunk_size_same_outputs(hf_model, budget):
    prompts = _prompts(4, seed=1)
    ref = _engine(hf_model, budget=4096).generate(prompts, GREEDY)
    eng = _engine(hf_model, budget=budget)
    outs = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert all(b.num_tokens <= budget for b in eng.runner.batches)


def test_preemption_under_a_small_cache_gives_the_same_greedy_outputs(hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, VOCAB, (100,), generator=g).tolist() for _ in range(4)]
    ample = _engine(hf_model).generate(prompts, params)
    small = _engine(hf_model, num_blocks=5)  # 4 x 140 tokens need 8 blocks at the end
    outs = small.generate(prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ample]
    assert small.block_manager.num_free_blocks == 5


def test_seeded_sampling_reproducible_across_batch_compositions(hf_model):
    mine = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=8, ignore_eos=True)
    prompt = _prompts(1, seed=5)[0]
    alone = _engine(hf_model).generate([prompt], mine)[0].token_ids
    others = _prompts(5, seed=6)
    mixed_params = [SamplingParams(temperature=0.9, max_tokens=5, seed=s) for s in range(5)]
    mixed = _engine(hf_model, budget=40).generate(
        others[:3] + [prompt] + others[3:], mixed_params[:3] + [mine] + mixed_params[3:]
    )
    assert mixed[3].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=8, ignore_eos=True)
    assert _engine(hf_model).generate([prompt], other_seed)[0].token_ids != alone


def test_n_samples_and_logprobs(hf_model):
    prompt = _prompts(1, seed=7)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=5, logprobs=3, ignore_eos=True)
    out = _engine(hf_model).generate([prompt], params)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    seq = out.outputs[1]
    ref = torch.log_softmax(
        hf_model(torch.tensor([prompt + seq.token_ids])).logits[0].float(), dim=-1
    )
    for k, lp in enumerate(seq.logprobs):
        row = ref[len(prompt) - 1 + k]
        assert lp.token_id == seq.token_ids[k]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


def test_stop_string_across_tokens_end_to_end(hf_model):
    prompt = _prompts(1, seed=8)[0]
    eng = _engine(hf_model, tokenizer=CharTokenizer())
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = eng.generate([prompt], base)[0]
    ids = full.token_ids
    stop = CharTokenizer().decode(ids[3:5])  # spans two tokens
    assert len(stop) == 2
    cut = eng.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], ignore_eos=True)
    )[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]


def test_over_long_prompt_rejected_at_once_naming_both_lengths(hf_model):
    eng = _engine(hf_model)
    with pytest.raises(ValueError, match=r"prompt has 2040 tokens and max_tokens=16.*2048"):
        eng.add_request([5] * 2040, SamplingParams(max_tokens=16))
    assert not eng.has_unfinished_requests()


def test_abort_and_async_stream(hf_model):
    eng = _engine(hf_model)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def main():
        rid = eng.add_request(_prompts(1, seed=9)[0], params)
        gone = eng.add_request(_prompts(1, seed=10)[0], SamplingParams(max_tokens=50))
        stream = eng.open_stream(rid)
        eng.step()
        assert eng.abort(gone) and not eng.abort(gone)
        seen = []

        async def consume():
            async for out in stream:
                seen.append(list(out.token_ids))

        task = asyncio.create_task(consume())
        while eng.has_unfinished_requests():
            await asyncio.to_thread(eng.step)  # stepping from another thread, as a server may
        await task
        return seen

    seen = asyncio.run(main())
    assert [len(s) for s in seen] == [1, 2, 3, 4]
    assert eng.block_manager.num_free_blocks == 64 and eng.num_unfinished_requests == 0
    stats = eng.stats()
    assert stats["num_requests_running"] == 0 and stats["kv_cache_usage"] == 0.0
    # the synchronous iterator yields the same growing outputs
    rid = eng.add_request(_prompts(1, seed=9)[0], params)
    outs = list(eng.iter_outputs(rid))
    assert [o.token_ids for o in outs] == seen and outs[-1].finish_reason == "length"


def test_llm_facade_with_a_runner_and_config_validation(hf_model):
    from dsv4.engine.config import EngineConfig
    from dsv4.engine.llm import LLM

    layout = KVCacheLayout(SPEC, block_size=128, num_blocks=8, num_state_slots=4)
    llm = LLM(
        runner=RecomputeRunner(hf_model, layout),
        max_num_seqs=4,
        max_num_batched_tokens=32,
        tokenizer=CharTokenizer(),
    )
    prompt = _prompts(1, seed=11)[0]
    (bare,) = llm.generate(prompt, GREEDY)
    assert bare.token_ids == _hf_greedy(hf_model, prompt, 6)
    (text_out,) = llm.generate(["hello"], GREEDY)
    assert text_out.text == CharTokenizer().decode(text_out.token_ids)
    with pytest.raises(ValueError, match=r"EngineConfig.block_size=100"):
        EngineConfig(block_size=100)
    with pytest.raises(ValueError, match=r"EngineConfig.max_num_seqs=0"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp4'"):
        EngineConfig(kv_cache_dtype="fp4")


def test_cache_layout_for_the_released_flash_config():
    import json
    from pathlib import Path

    from dsv4.engine.config import EngineConfig
    from dsv4.engine.llm import cache_layout_for

    cfg = json.loads(
        (Path(__file__).parent / "data/configs/deepseek-v4-flash.config.json").read_text()
    )
    cfg_engine = EngineConfig(
        kv_cache_dtype="fp8",
        kv_cache_memory_bytes=8 << 30,
        max_num_seqs=64,
        reference_seq_len=32768,
    )
    layout = cache_layout_for(cfg, cfg_engine)
    assert layout.spec.entry_bytes == 584 and layout.total_bytes <= 8 << 30
    # balanced: the slots and blocks serve the same number of 32k-token requests
    per_seq_blocks = layout.blocks_needed(32768)
    assert layout.num_blocks // per_seq_blocks == layout.num_state_slots
