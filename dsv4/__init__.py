"""dsv4: run, serve, benchmark and plan DeepSeek-V4 models on any accelerator."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "ModelArgs", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import dsv4` (and the planner, which must not import torch) stays light.
    if name == "load_model":
        from dsv4.model.loader import load_model

        return load_model
    if name == "ModelArgs":
        from dsv4.model.config import ModelArgs

        return ModelArgs
    if name == "SamplingParams":
        from dsv4.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")
