"""EngineConfig: the knobs of the serving engine, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.engine.kv_cache import KV_CACHE_DTYPES

DEFAULT_KV_CACHE_MEMORY_BYTES = 1 << 30  # 1 GiB: safe on a laptop CPU; raise it on accelerators
DEFAULT_REFERENCE_SEQ_LEN = 4096


@dataclass
class EngineConfig:
    """How the engine batches and how much memory its cache takes.

    max_num_seqs: requests running at once (also caps the cache's state slots).
    max_num_batched_tokens: tokens per step (prefill chunks + decodes), the chunk budget.
    max_model_len: longest prompt + output; None = the model's max_position_embeddings.
    kv_cache_memory_bytes: the cache's byte budget, split between per-request state slots
      (window rings, compressor states) and context blocks, balanced for `reference_seq_len`.
    block_size: tokens per cache block (a multiple of 128, the HCA ratio).
    num_speculative_tokens: 0, or 1 to decode with the checkpoint's MTP layer as the drafter:
      each decode step verifies the MTP's guess for the next token alongside the current one,
      so a step can yield two tokens. Outputs are those of plain decoding (see llm_engine.py).
    compile: run steps in which every request decodes one token through `torch.compile`d
      graphs (engine/decode_graph.py; CPU only). Compiling takes a minute or more the first
      time (inductor caches the result on disk); `LLM` does it when it starts.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_dtype: str = "bf16"
    kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_MEMORY_BYTES
    block_size: int = 128
    reference_seq_len: int = DEFAULT_REFERENCE_SEQ_LEN
    num_speculative_tokens: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_cache_memory_bytes",
            "reference_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r} must be a positive integer.")
        if self.num_speculative_tokens not in (0, 1):
            raise ValueError(
                f"EngineConfig.num_speculative_tokens={self.num_speculative_tokens!r} is not "
                "supported; use 0 (off) or 1 (one MTP draft token per step)."
            )
        if self.compile and self.num_speculative_tokens:
            raise ValueError(
                "EngineConfig.compile=True compiles steps in which each request decodes one "
                "token, and with num_speculative_tokens=1 every step also carries a draft; "
                "use one of the two."
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len} must be >= 2.")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"EngineConfig.kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one "
                f"of {KV_CACHE_DTYPES}."
            )
        if self.block_size < 128 or self.block_size % 128:
            raise ValueError(
                f"EngineConfig.block_size={self.block_size} must be a positive multiple of 128 "
                "(one HCA entry covers 128 tokens)."
            )
