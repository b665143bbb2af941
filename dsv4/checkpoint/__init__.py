"""Safetensors checkpoints in DeepSeek-V4's released layout: read lazily, write, quantise."""
