"""ServerArgs: everything `dsv4 serve` can be told, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "dsv4-tiny"
API_KEY_ENV = "DSV4_API_KEY"


@dataclass
class ServerArgs:
    """How to load the model and how the HTTP server behaves.

    served_model_names: the names clients may put in `model` (default: the folder's name).
    max_queue: sequences that may wait for a running slot beyond `max_num_seqs`; a request
      that would exceed it gets 429 with Retry-After.
    shutdown_timeout_s: on SIGTERM/SIGINT, how long in-flight requests may run to their end
      before they are aborted.
    max_request_bytes: the largest request body accepted (413 beyond it). The default holds
      a 1M-token prompt with room to spare.
    """

    model: str = str(BUNDLED_MODEL)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_names: list[str] = field(default_factory=list)
    device: str | None = None
    dtype: str | None = None
    kv_cache_dtype: str = "bf16"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    num_speculative_tokens: int = 0
    compile: bool = False
    max_queue: int = 256
    shutdown_timeout_s: float = 30.0
    max_request_bytes: int = 64 << 20
    torch_threads: int | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        folder = Path(self.model)
        if not (folder / "config.json").is_file():
            hint = (
                "the bundled dsv4-tiny model is not installed; train it with "
                f"`dsv4 train --out {BUNDLED_MODEL}` or pass --model PATH"
                if folder == BUNDLED_MODEL
                else "pass --model with a DeepSeek-V4 checkpoint folder"
            )
            raise ValueError(f"ServerArgs.model={self.model!r} has no config.json: {hint}.")
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(
                f"ServerArgs.model={self.model!r} has no tokenizer.json; the server needs the "
                "model's tokenizer next to its weights."
            )
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if not self.served_model_names:
            self.served_model_names = [folder.resolve().name]
        for name in ("port", "max_num_seqs", "max_num_batched_tokens", "max_request_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerArgs.{name}={value!r} must be a positive integer.")
        if self.max_queue < 0:
            raise ValueError(f"ServerArgs.max_queue={self.max_queue} must be >= 0.")
        if self.port > 65535:
            raise ValueError(f"ServerArgs.port={self.port} must be at most 65535.")
        if not 0 <= self.shutdown_timeout_s < float("inf"):  # NaN too
            raise ValueError(
                f"ServerArgs.shutdown_timeout_s={self.shutdown_timeout_s} must be >= 0."
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"ServerArgs.torch_threads={self.torch_threads} must be >= 1.")
