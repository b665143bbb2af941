"""What `torch.compile` (inductor, CPU) does for a single-sequence decode step, against the
same code run eagerly in the same process: the question behind the engine issue's target of
decoding one request 2x faster than transformers, where a step is ~1,900 small torch ops.

1. mHC, the largest group of those ops: `hc_pre` + `hc_post` of one sub-block for one token,
   eager (Sinkhorn in numpy, as the engine runs it) vs compiled (Sinkhorn in torch, fused).
2. The whole model's decode step (`Transformer.forward` with its dense cache) as it is written
   today, eager vs `torch.compile(dynamic=True)`, with the graph breaks dynamo reports.

    python benchmarks/compile_decode.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_cpu import SMALL  # noqa: E402

from dsv4.model import hyper  # noqa: E402
from dsv4.model.config import ModelArgs  # noqa: E402
from dsv4.model.transformer import Transformer  # noqa: E402
from dsv4.train.trainer import init_weights  # noqa: E402


def per_call_us(fn, *args, repeats: int = 2000) -> float:
    with torch.inference_mode():
        for _ in range(50):
            fn(*args)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(*args)
    return (time.perf_counter() - start) / repeats * 1e6


def mhc_sub_block(layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    _, post, comb = layer._pre(x, "attn")
    return hyper.hc_post(out, x, post, comb)


def decode_ms(model: Transformer, step, prompt: torch.Tensor, tokens: int = 32):
    """Greedy decode after a prefill -> (ms per token, the tokens)."""
    with torch.inference_mode():
        cache = model.new_cache()
        model.prefill(prompt, cache)
        token, out = prompt[:, -1:], []
        start = time.perf_counter()
        for _ in range(tokens):
            token = step(token, cache)[:, -1].argmax(-1, keepdim=True)
            out.append(token.item())
    return (time.perf_counter() - start) / tokens * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Transformer(ModelArgs(**SMALL))
    init_weights(model, 0)
    model.eval()
    layer, a = model.layers[0], model.args

    x = torch.randn(1, 1, a.hc_mult, a.hidden_size)
    out = torch.randn(1, 1, a.hidden_size)
    eager_us = per_call_us(mhc_sub_block, layer, x, out)
    with torch.inference_mode():
        expected = mhc_sub_block(layer, x, out)
    # Sinkhorn in torch, so that dynamo can trace it; dynamo guards on this value, so it stays
    # set while the compiled code runs (else it would recompile with the numpy path)
    numpy_limit, hyper.NUMPY_MAX_MATRICES = hyper.NUMPY_MAX_MATRICES, 0
    compiled = torch.compile(mhc_sub_block, dynamic=False)
    with torch.inference_mode():
        start = time.perf_counter()
        got = compiled(layer, x, out)
        mhc_compile_s = time.perf_counter() - start
    compiled_us = per_call_us(compiled, layer, x, out)
    hyper.NUMPY_MAX_MATRICES = numpy_limit
    error = (got - expected).abs().max().item()

    prompt = torch.randint(0, a.vocab_size, (1, args.prompt_len))
    decode_ms(model, model.forward, prompt, 4)  # warm-up
    eager_ms, eager_tokens = decode_ms(model, model.forward, prompt)
    torch._dynamo.utils.counters.clear()
    step = torch.compile(model.forward, dynamic=True)
    start = time.perf_counter()
    decode_ms(model, step, prompt)  # compiles, and recompiles as the cache grows
    step_compile_s = time.perf_counter() - start
    compiled_ms, compiled_tokens = decode_ms(model, step, prompt)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())

    print(f"mHC sub-block, 1 token:  eager {eager_us:7.1f} us  compiled {compiled_us:7.1f} us  "
          f"{eager_us / compiled_us:4.2f}x  (compile {mhc_compile_s:.0f} s, max diff {error:.1e})")
    print(f"decode step, 1 sequence: eager {eager_ms:7.2f} ms  compiled {compiled_ms:7.2f} ms  "
          f"{eager_ms / compiled_ms:4.2f}x  (compile {step_compile_s:.0f} s, {breaks} graph "
          f"breaks, same tokens: {eager_tokens == compiled_tokens})")
    print(json.dumps({"mhc_eager_us": eager_us, "mhc_compiled_us": compiled_us,
                      "decode_eager_ms": eager_ms, "decode_compiled_ms": compiled_ms,
                      "graph_breaks": breaks, "same_tokens": eager_tokens == compiled_tokens}))


if __name__ == "__main__":
    main()
