"""`dsv4.LLM`: the offline entry point (vLLM-style) over LLMEngine."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsv4.engine.config import EngineConfig
from dsv4.engine.decode_graph import step_kind_sizes
from dsv4.engine.kv_cache import CacheSpec, KVCacheLayout, plan_layout
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.request import RequestOutput
from dsv4.engine.runner import ModelRunner
from dsv4.engine.sampling_params import SamplingParams

log = logging.getLogger("dsv4.engine")


def cache_layout_for(model_config: Any, config: EngineConfig) -> KVCacheLayout:
    """Pools for a model config (ModelArgs, transformers config or config.json dict)."""
    spec = CacheSpec.from_config(model_config, config.kv_cache_dtype,
                                 num_mtp_layers=config.num_speculative_tokens)
    max_model_len = config.max_model_len or _get(model_config, "max_position_embeddings")
    return plan_layout(
        spec,
        config.kv_cache_memory_bytes,
        config.max_num_seqs,
        reference_seq_len=min(config.reference_seq_len, int(max_model_len)),
        block_size=config.block_size,
    )


def _get(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


class LLM:
    """Generate from many prompts at once with continuous batching and the paged V4 cache.

    llm = LLM(model=path, device="cpu", kv_cache_dtype="fp8", max_num_seqs=32,
              max_num_batched_tokens=1024, kv_cache_memory_bytes=4 << 30)
    outs = llm.generate(["Hello", [0, 42, 7]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

    Text prompts and stop strings use `tokenizer`, by default the model folder's
    tokenizer.json. `num_speculative_tokens=1` decodes with the checkpoint's MTP layer as a
    drafter (same outputs, up to two tokens per step). `compile=True` (CPU) runs decode steps
    through compiled graphs, about 2x faster for one request on a 2-core CPU, after compiling
    them here (a minute or more the first time). `runner` replaces the model runner
    built from `model` (another backend, or a test double); it must follow the ModelRunner
    contract and carry its cache layout.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        kv_cache_dtype: str = "bf16",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        block_size: int = 128,
        num_speculative_tokens: int = 0,
        compile: bool = False,
        tokenizer: Any = None,
        runner: ModelRunner | None = None,
    ) -> None:
        self.config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            kv_cache_dtype=kv_cache_dtype,
            block_size=block_size,
            num_speculative_tokens=num_speculative_tokens,
            compile=compile,
            **({"kv_cache_memory_bytes": kv_cache_memory_bytes}
               if kv_cache_memory_bytes is not None else {}),
        )
        if runner is None:
            if model is None:
                raise ValueError("LLM needs model=PATH (a V4 checkpoint directory).")
            runner, model_max_len = _build_runner(model, device, dtype, self.config)
        else:
            if compile:
                raise ValueError(
                    "compile=True builds the decode graphs of the runner LLM makes from model=; "
                    "a runner passed in compiles its own (V4ModelRunner(..., compile=True))."
                )
            if runner.num_speculative_tokens != num_speculative_tokens:
                raise ValueError(
                    f"num_speculative_tokens={num_speculative_tokens} but the runner drafts "
                    f"{runner.num_speculative_tokens} (its cache layout decides); pass the same "
                    "number to both."
                )
            model_max_len = runner.layout.max_tokens_per_seq
        max_len = self.config.max_model_len or model_max_len
        self.engine = LLMEngine(
            runner,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_model_len=max_len,
            tokenizer=tokenizer if tokenizer is not None else _folder_tokenizer(model),
        )
        if getattr(runner, "decode_graph", None) is not None:
            self._compile_decode(max_len)

    def _compile_decode(self, max_model_len: int) -> None:
        """Compile the decode graphs now, not during the first requests: a decode step of one
        request, of two and of nine (`step_kind_sizes`), as far as the engine batches, make
        every kind of every block's graph, and a prefill of two tokens the general path's
        hyper-connections (a one-token prompt is a decode step). (Where the token budget keeps
        them from decoding in one step here, the first such step later compiles its graphs.)"""
        log.info("compiling the decode step (a minute or more the first time on a CPU; "
                 "inductor caches it on disk)")
        start = time.perf_counter()
        params = SamplingParams(temperature=0, ignore_eos=True,
                                max_tokens=min(2, max_model_len - 1))
        with warnings.catch_warnings():
            # dynamo notes that it traces through functools.cache; those functions build
            # constant tensors (Sinkhorn's 0/1 matrices, FP4 tables), which it may rebuild
            warnings.filterwarnings("ignore", message=".*functools.lru_cache")
            if max_model_len > 2:
                self.engine.generate([[1, 1]], SamplingParams(temperature=0, max_tokens=1))
            for num in step_kind_sizes():
                if num <= self.config.max_num_seqs:
                    self.engine.generate([[1 + i] for i in range(num)], params)
        log.info("decode step compiled in %.0f s", time.perf_counter() - start)

    # the server drives these directly
    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        return self.engine.add_request(prompt, params, request_id)

    def step(self) -> list[RequestOutput]:
        return self.engine.step()

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def open_stream(self, request_id: str):
        return self.engine.open_stream(request_id)

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A single prompt may be passed bare."""
        if hasattr(prompts, "tolist"):  # a tensor or array of token ids
            prompts = prompts.tolist()
        if not isinstance(prompts, (str, list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids or a list of "
                             f"those, got {type(prompts).__name__}")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self.engine.generate(prompts, sampling_params)  # type: ignore[arg-type]


def _build_runner(
    model: str | os.PathLike, device: str | None, dtype: str | None, config: EngineConfig
) -> tuple[ModelRunner, int]:
    """The paged V4 runner over dsv4.model."""
    from dsv4.engine.model_runner import V4ModelRunner

    runner = V4ModelRunner.from_pretrained(model, device=device, dtype=dtype, config=config)
    return runner, runner.max_model_len


def _folder_tokenizer(model: str | os.PathLike | None) -> Any:
    """The tokenizer.json next to the weights, if there is one (released checkpoints and
    dsv4-tiny ship one); None otherwise, and then prompts must be token ids."""
    if model is None or not (Path(model) / "tokenizer.json").is_file():
        return None
    from dsv4.chat.tokenizer import Tokenizer

    return Tokenizer.from_folder(model)
