"""Test helper: a tiny V4 model folder and a real `dsv4 serve` subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "dsv4" / "assets" / "dsv4-tiny"

# hidden 64, three layers covering the compress ratios 0 / 4 / 128, a hash-routed layer
TINY_SERVER_CONFIG = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, head_dim=64,
    qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=32, n_routed_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=64, index_n_heads=2, index_head_dim=32,
    index_topk=8, sliding_window=128, compress_ratios=[0, 4, 128, 0], num_hash_layers=1,
    max_position_embeddings=4096,
)


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    """A random V4 model with a BPE tokenizer trained on a few hundred corpus texts."""
    import torch

    from dsv4.chat import Tokenizer, encode_messages
    from dsv4.model.config import ModelArgs
    from dsv4.model.transformer import Transformer
    from dsv4.train import data
    from dsv4.train.tokenizer import train_tokenizer
    from dsv4.train.trainer import init_weights, save

    examples = list(data.generate_examples(300, seed=seed))
    texts = [encode_messages(e.messages, e.thinking_mode) for e in examples]
    tokenizer = Tokenizer(train_tokenizer(texts, TINY_SERVER_CONFIG["vocab_size"]))
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**TINY_SERVER_CONFIG))
    init_weights(model, seed)
    with torch.no_grad():  # init_weights' 0.02 gives near-uniform logits; make outputs varied
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(25)
    save(model, tokenizer, out, quantize="none")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m dsv4.cli serve ...` with this checkout's dsv4 on the path."""

    def __init__(self, model: Path, *extra: str, api_key: str | None = None,
                 name: str = "dsv4-test", timeout_s: float = 90.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "dsv4.cli", "serve", "--model", str(model),
               "--port", str(self.port), "--served-model-name", name, "--device", "cpu",
               "--dtype", "fp32", "--torch-threads", "1", "--log-level", "warning",
               "--kv-cache-memory-bytes", str(64 << 20), *extra]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        env.pop("DSV4_API_KEY", None)
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dsv4-serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5.0).json()

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples of /metrics by their full name."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5.0).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
