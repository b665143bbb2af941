"""dsv4: run, serve, benchmark and plan DeepSeek-V4 models on any accelerator."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "ModelArgs", "SamplingParams", "__version__", "load_model"]

# name -> module that defines it; imported on first use so that `import dsv4` (and the
# planner, which must not import torch) stays light
_LAZY = {
    "load_model": "dsv4.model.loader",
    "ModelArgs": "dsv4.model.config",
    "LLM": "dsv4.engine.llm",
    "SamplingParams": "dsv4.engine.sampling_params",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")
