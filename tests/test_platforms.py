from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dsv4 import platforms
from dsv4.platforms import available_platforms, get_platform, register_platform
from dsv4.platforms.cpu import CpuPlatform, keep_freed_memory


def test_cpu_platform_runs_tensors():
    p = get_platform("cpu")
    x = torch.ones(2, device=p.device())
    p.synchronize()
    assert x.device.type == "cpu" and p.dist_backend == "gloo"
    assert p.memory_bytes() > 2**30


def test_best_available_is_cuda_then_npu_then_cpu():
    names = available_platforms()
    assert names[-1] == "cpu"
    assert get_platform().name == names[0]
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_errors_name_the_device_and_the_fix():
    with pytest.raises(ValueError, match="unknown device 'tpu'.*cpu"):
        get_platform("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            get_platform("cuda")
    with pytest.raises(ValueError, match="--device cpu"):
        get_platform("npu")  # torch_npu is not installed here


def test_register_a_new_platform():
    class Fake(CpuPlatform):
        name = "fakecpu"

    register_platform("fakecpu", Fake)
    try:
        assert get_platform("fakecpu").name == "fakecpu"
    finally:
        platforms._REGISTRY.pop("fakecpu")


def test_a_device_number_picks_that_device_and_is_checked():
    class TwoMetaDevices(CpuPlatform):  # a stand-in for a 2-GPU machine: no GPU here
        name, device_type = "twometa", "meta"

        @classmethod
        def device_count(cls) -> int:
            return 2

    register_platform("twometa", TwoMetaDevices)
    try:
        assert get_platform("twometa:1").device() == torch.device("meta", 1)
        assert get_platform("twometa").device() == torch.device("meta", 0)
        with pytest.raises(ValueError, match="2 twometa device.*twometa:0 to twometa:1"):
            get_platform("twometa:2")
        with pytest.raises(ValueError, match="device number"):
            get_platform("twometa:first")
    finally:
        platforms._REGISTRY.pop("twometa")
    assert get_platform("cpu:0").device() == torch.device("cpu")
    with pytest.raises(ValueError, match="1 cpu device"):
        get_platform("cpu:1")


@pytest.mark.parametrize("bf16_matmul, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_models_load_in_bf16_only_where_the_cpu_multiplies_it_in_hardware(
        monkeypatch, bf16_matmul, dtype):
    # Without bf16 hardware (AVX2 only) torch's bf16 matmul fallback made a dsv4-tiny prefill
    # 2.7x to 3.6x slower than float32; an explicit dtype still wins.
    from dsv4.model.loader import load_model
    from dsv4.train.evaluate import BUNDLED

    monkeypatch.setattr("dsv4.platforms.cpu.has_bf16_matmul", lambda: bf16_matmul)
    assert CpuPlatform().default_dtype == dtype
    assert load_model(BUNDLED, device="cpu").layers[0].attn.wq_a.weight.dtype == dtype
    explicit = load_model(BUNDLED, device="cpu", dtype=torch.float16)
    assert explicit.layers[0].attn.wq_a.weight.dtype == torch.float16


MMAPPED_MB_OF_A_20_MB_TENSOR = """
import ctypes, sys, torch
from dsv4.platforms import get_platform
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    get_platform("cpu").configure_allocator()
before = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
x = torch.empty(20 << 18)
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_the_cpu_platform_serves_large_tensors_from_the_heap():
    """glibc maps a fresh 20 MB block with mmap (and unmaps it on free, so its pages fault
    in again next time); once an engine has configured the CPU, it comes from the heap."""
    def mmapped_mb(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", MMAPPED_MB_OF_A_20_MB_TENSOR, mode],
                             capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    assert keep_freed_memory()
    assert (mmapped_mb("default"), mmapped_mb("tuned")) == (20, 0)
