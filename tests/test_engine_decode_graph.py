"""The decode step written for torch.compile (dsv4/engine/decode_graph.py): run eagerly, it
must give the outputs of the runner's general path and of the model alone; compiled, the same.

The eager runs check the graph's math in seconds; the compiled run costs 1.5 to 3 minutes of
inductor on a 2-core CPU and checks what dynamo and inductor make of it: symbolic batch size
and entry counts, in-place cache writes, and the guard-free calls after warm-up."""

from __future__ import annotations

import pytest
import torch
from v4_oracle import hf_model, released_state_dict, tiny_args

import dsv4
from dsv4.checkpoint.writer import write_checkpoint
from dsv4.engine.config import EngineConfig
from dsv4.engine.decode_graph import DecodeGraph
from dsv4.engine.llm import LLM
from dsv4.engine.model_runner import V4ModelRunner
from dsv4.engine.sampling_params import SamplingParams
from dsv4.model import moe
from dsv4.model.transformer import Transformer
from dsv4.platforms.cpu import CpuPlatform
from dsv4.train.trainer import init_weights

# 5: inside the window (16); 40, 61: a few CSA entries; 130, 255: the first HCA entries
# (ratio 128) and more CSA entries than 4x top-k (6); the outputs cross 128 and 256
LENGTHS = [5, 40, 61, 130, 250, 255]
# different lengths, so that the batch shrinks to one request before the end
MAX_TOKENS = [12, 20, 6, 16, 9, 24]


def _checkpoint(tmp_path_factory, **overrides):
    args = tiny_args(**overrides)
    hf = hf_model(args)
    path = tmp_path_factory.mktemp("v4")
    write_checkpoint(released_state_dict(hf, args), path, config=args.to_dict())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, args.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    model = dsv4.load_model(path, device="cpu", dtype=torch.float32, kv_cache_dtype="auto",
                            indexer_cache_dtype="auto")
    alone = [model.generate(torch.tensor([p]), n)[0, len(p):].tolist()
             for p, n in zip(prompts, MAX_TOKENS)]
    return path, prompts, alone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory)  # window-only, CSA, HCA and CSA layers


@pytest.fixture(scope="module")
def three_kinds_of_block(tmp_path_factory):
    """A hashed CSA layer (indexer, two compressors, top-k), an HCA layer (entries padded to
    2, where dynamo would otherwise specialise) and a window-only layer: nine graphs to compile
    (three kinds of block, each for every kind of step): 104 s with their C++ wrappers on a
    2-core AVX-512 EPYC with an empty inductor cache (the six of two kinds of step took ~3
    minutes on an AVX2 one)."""
    return _checkpoint(tmp_path_factory, num_hidden_layers=3, compress_ratios=[4, 128, 0, 0])


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return _checkpoint(tmp_path_factory, num_hidden_layers=1, compress_ratios=[4, 0])


def _generate(llm: LLM, prompts) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    return [o.token_ids for o in llm.generate(prompts, params)]


class _Counting:
    """Counts the steps a decode graph serves, and finds the largest memory allocation any
    of them made (the profiler's raw allocation events: inside a compiled graph's C++, only
    they show a buffer that is allocated and freed within the call)."""

    def __init__(self, graph: DecodeGraph) -> None:
        self.graph, self.steps, self.batch_sizes = graph, 0, set()
        self.largest_allocation = 0

    def __call__(self, batch):
        self.steps += 1
        self.batch_sizes.add(batch.num_tokens)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            logits = self.graph(batch)
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]"]
        self.largest_allocation = max([self.largest_allocation, *sizes])
        return logits


BATCHED_EXPERTS = ("dsv4::grouped_experts", "dsv4::padded_experts", "dsv4_cpu::padded_experts")


class _Profiled:
    """Whether a decode graph's steps of each batch size ran the batched expert products (a
    custom op, which the profiler sees inside a compiled graph)."""

    def __init__(self, graph: DecodeGraph) -> None:
        self.graph, self.batched_experts = graph, {}

    def __call__(self, batch):
        with torch.profiler.profile() as prof:
            logits = self.graph(batch)
        ran = any(e.key in BATCHED_EXPERTS for e in prof.key_averages())
        self.batched_experts.setdefault(batch.num_tokens, ran)
        assert self.batched_experts[batch.num_tokens] == ran
        return logits


def _engine(path, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="fp32", max_num_seqs=8, max_num_batched_tokens=512,
                   kv_cache_memory_bytes=32 << 20)
    return LLM(model=str(path), **{**options, **kwargs})


def test_decode_graph_run_eagerly_equals_the_model_alone(checkpoint):
    path, prompts, alone = checkpoint
    llm = _engine(path)
    runner = llm.engine.runner
    graph = _Counting(DecodeGraph(runner.model, runner.pools, runner.layout.block_size,
                                  runner.fp8))  # eager: no compile options
    runner.decode_graph = graph
    assert _generate(llm, prompts) == alone
    assert graph.steps >= max(MAX_TOKENS) - 1  # every decode step went through the graph
    assert {1, len(prompts)} <= graph.batch_sizes


def test_decode_graph_reads_and_writes_packed_fp8_entries_as_the_general_path():
    """kv_cache_dtype="fp8": the graph packs window rows and compressed entries into
    584-byte entries and unpacks what it reads, as the general path does (FP4 indexer too)."""
    args = tiny_args(head_dim=512, qk_rope_head_dim=64, index_head_dim=128,
                     num_hidden_layers=2, compress_ratios=[4, 128, 0])  # released geometry
    model = Transformer(args, kv_cache_dtype="fp8", indexer_cache_dtype="fp4")
    init_weights(model, seed=3)
    model.eval()
    config = EngineConfig(kv_cache_dtype="fp8", max_num_seqs=4,
                          kv_cache_memory_bytes=64 << 20)
    g = torch.Generator().manual_seed(2)
    # decoding from 250 closes an HCA window (at 255) and CSA windows inside the graph
    prompts = [torch.randint(2, args.vocab_size, (n,), generator=g).tolist()
               for n in (7, 250, 257)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    outputs = []
    for use_graph in (False, True):
        runner = V4ModelRunner.for_model(model, config)
        assert runner.pools["0.compressed_kv"].dtype == torch.uint8
        if use_graph:
            runner.decode_graph = DecodeGraph(model, runner.pools, runner.layout.block_size,
                                              runner.fp8)
        llm = LLM(runner=runner, max_num_seqs=4, kv_cache_dtype="fp8")
        outputs.append(llm.generate(prompts, params))
    for general, graph in zip(*outputs):
        assert graph.token_ids == general.token_ids
        for a, b in zip(general.logprobs, graph.logprobs):  # the top 5 of every step
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)


def test_compile_is_refused_where_it_would_do_nothing_or_the_wrong_thing(checkpoint,
                                                                       monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(compile=True, num_speculative_tokens=1)
    runner = _engine(checkpoint[0]).engine.runner  # built without compile
    with pytest.raises(ValueError, match="runner passed in compiles its own"):
        LLM(runner=runner, compile=True)
    # a platform without compile options (CUDA and NPU today) refuses before loading weights:
    # here the folder is empty, and the error is still about compile
    monkeypatch.setattr(CpuPlatform, "compile_options", None)
    with pytest.raises(ValueError, match=r"CPU only so far; on cpu leave it off"):
        LLM(model=str(tmp_path), device="cpu", compile=True)


def test_compiled_decode_steps_give_the_outputs_of_the_model_alone(three_kinds_of_block,
                                                                   monkeypatch):
    path, prompts, alone = three_kinds_of_block
    monkeypatch.setattr(moe, "GATHERED_MAX_TOKENS", 2)  # so that 6 requests make every kind
    # room for 64 sequences: every cache pool a step writes is larger than anything a step
    # of 6 requests needs to allocate
    llm = _engine(path, compile=True, max_num_seqs=64)  # compiles steps of 1, 2, 3 requests
    graph = llm.engine.runner.decode_graph
    assert graph.traced == {"one", "few", "many"}  # every kind of graph before any request
    counting = _Counting(graph)
    llm.engine.runner.decode_graph = counting
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert _generate(llm, prompts) == alone  # prefills through compiled hyper-connections
    assert counting.steps >= max(MAX_TOKENS) - 1
    assert {1, 2, len(prompts)} <= counting.batch_sizes
    # the warm-up compiled every graph: the prefills' and every kind of decode step's
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    # the cache writes go in place: no graph copies a pool it writes (which inductor does
    # when a read of the pool comes after the write in its graph: `CpuPlatform`)
    pools = {name: pool.nbytes for name, pool in llm.engine.runner.pools.items()
             if "window" in name or "compressor" in name}
    assert counting.largest_allocation < min(pools.values()), (counting.largest_allocation, pools)


@pytest.fixture
def dynamo_without_inductor(monkeypatch):
    """torch.compile with dynamo's "eager" backend: the same tracing, guards and graph cache
    (what decides which graph runs), without inductor's code generation, so in seconds."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph, options: real_compile(
        fn, fullgraph=fullgraph, backend="eager"))
    torch._dynamo.reset()  # no graphs from other tests
    yield
    torch._dynamo.reset()


def test_a_kind_of_step_first_seen_late_gets_its_own_graphs(one_layer, dynamo_without_inductor,
                                                            monkeypatch):
    """Steps of one kind run with guards skipped once their graphs exist; the first step of
    another kind must still trace graphs of its own, not run those of a kind seen before
    (dynamo refuses to recompile under the skipping stance, so that would fail loudly), and
    once every kind is traced each step must run its own kind's graph: a few requests their
    own experts' rows, more the batched products over every expert (a custom op, seen by the
    profiler)."""
    monkeypatch.setattr(moe, "GATHERED_MAX_TOKENS", 2)
    path, prompts, alone = one_layer
    llm = _engine(path)
    runner = llm.engine.runner
    graph = DecodeGraph(runner.model, runner.pools, runner.layout.block_size, runner.fp8, {})
    runner.decode_graph = graph  # not warmed up by LLM: kinds are traced as steps come

    def generate(picked):
        params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS[i], ignore_eos=True)
                  for i in picked]
        return [o.token_ids for o in llm.generate([prompts[i] for i in picked], params)]

    assert generate([0]) == [alone[0]]
    assert graph.traced == {"one"}
    assert generate([0, 1, 2]) == [alone[i] for i in (0, 1, 2)]  # 3, then 2, then 1 request
    assert graph.traced == {"one", "few", "many"}
    runner.decode_graph = profiled = _Profiled(graph)
    for picked in ([0, 1], [0, 1, 2], [3, 4]):
        assert generate(picked) == [alone[i] for i in picked]
    assert profiled.batched_experts == {1: False, 2: False, 3: True}
