"""The CPU: plain PyTorch, the reference every other platform is tested against."""

from __future__ import annotations

import ctypes
import os

import torch

from dsv4.model.moe import GATHERED_MAX_TOKENS
from dsv4.platforms.base import Platform


def has_bf16_matmul() -> bool:
    """True when this CPU runs bf16 matmuls in hardware (oneDNN's bf16 kernels, on AVX-512
    CPUs and newer). Without them (AVX2 only) torch falls back to a path many times slower than
    float32: 27x for a 512 x 512 product on a 2-core AVX2 EPYC, 2.7x to 3.6x for a dsv4-tiny
    prefill."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64 bits
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    torch's CPU allocator is malloc. By default glibc serves large blocks (a prefill's
    activations, megabytes each) with fresh mmaps and gives them back on free, and trims the
    heap's free top, so later steps' tensors page-fault their memory in again. Three rounds
    of 1 and 32 requests in `benchmarks/engine_throughput.py`'s config on a 2-core box took
    about a million faults and 3 to 4 s of kernel time; keeping freed memory (blocks up to
    32 MB from the heap, no trimming below 2 GB free), 60 to 90 thousand faults and about
    1 s, and 32 requests ran 4% to 6% faster. The process's memory then stays at its peak,
    as with the caching allocators of GPUs. False where malloc is not glibc's (macOS, musl),
    which is left as it is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    # inductor turns matrix products of as few rows as a "few requests" decode step has into
    # fused loops instead of BLAS calls: 47 calls, ~2.5 ms of a ~13 ms one-request step on a
    # 2-core EPYC. (The threshold is read when inductor first imports the pass, so it holds
    # for the process's compiles.)
    # cpp_wrapper: each graph's calls of its kernels, allocations and checks run as compiled
    # C++ instead of generated Python (~20 kernels and ~130 buffers a graph). Decode steps of
    # 1 to 32 requests 11-16% faster in bf16 on a 2-core EPYC, 2-6% in fp32; the first
    # compile takes longer.
    # reorder_for_locality off: that pass moves each node next to its first user, so a ring's
    # read of the rows before this token (the window, the compressors' state) slid past the
    # write of this token's row; the write then could not be made in place, and each graph
    # copied every cache pool it writes, whole, out and back, every step (1-1.75 MB of pools
    # a layer in bf16 at 32 sequences, growing with --max-num-seqs). Without it the writes go
    # in place: one-request steps 2.6 -> 2.1 ms, 32-request 8.9 -> 8.4 ms (in-process A/B on
    # the benchmark config). tests/test_engine_decode_graph.py checks the allocations.
    compile_options = {"cpp_wrapper": True, "reorder_for_locality": False,
                       "post_grad_fusion_options": {"decompose_mm_pass": {
                           "cpu_max_first_dimension_decomposition": GATHERED_MAX_TOKENS}}}

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if has_bf16_matmul() else torch.float32

    def synchronize(self) -> None:
        pass

    def configure_allocator(self) -> None:
        keep_freed_memory()

    def memory_bytes(self) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
