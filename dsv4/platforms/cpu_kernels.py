"""bf16 matrix products on CPUs with AVX-512 BF16, by kernels of our own (cpu_kernels.cpp).

A decode step of many requests gives each routed expert a few rows to ~20 (32 requests of the
benchmark config: 64 rows over 8 experts), and each dense product 32 rows. At those sizes
torch's bf16 products (oneDNN) reach about half the rate the same CPU gets on a large matmul,
and the experts' padded layout multiplies every expert's zero rows up to the busiest's count.
The kernels run each expert's own rows only, with weights packed once at load so that every
step reads them as contiguous 512-bit operands, and fuse the experts' SwiGLU into their first
product: on a 2-core Zen 4 EPYC 1.7x-3x faster than torch's products on the benchmark
config's shapes, with the same bits (docs/benchmarks.md).

- `padded_experts`: the routed experts of a compiled step of many tokens (`MoE._padded`),
  the torch op `dsv4_cpu::padded_experts`, which a compiled graph calls from its C++ without
  Python.
- `experts_swiglu` / `experts_matmul`: the routed experts over rows sorted by expert (the
  eager path's `grouped_experts` custom op, which runs Python anyway), through ctypes.
- `linear`: a dense product, the torch op `dsv4_cpu::linear` (the model's `fusion.linear`
  picks it, except in compiled graphs of a few rows).

The source ships with the package and is compiled on first use, against torch's headers,
with the C++ compiler that torch.compile also needs (`$CXX`, else `c++`; ~5 s), into a cache
directory (`$DSV4_CACHE_DIR`, else `$XDG_CACHE_HOME/dsv4` or `~/.cache/dsv4`). Where the CPU
lacks AVX-512 BF16 or has AMX (`_cpu_gains`), the compiler is missing or the shapes do not
fit (columns a multiple of 64, an even inner dim), the model keeps torch's products; so do
float32 models. The packed copies double the memory of the weights they cover.
`DSV4_CPU_KERNELS=0` turns the kernels off (`enabled`: read when the weights are packed and
when a product is traced or run).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-mavx512f", "-mavx512bf16",
         "-mfma", "-w"]  # -w: torch's headers warn under C++17
COLUMN_BLOCK = 64  # output columns per packed block: four 16-float vectors

enabled = os.environ.get("DSV4_CPU_KERNELS", "1") != "0"


def can_pack(w: torch.Tensor) -> bool:
    """Whether weights w [N, K] or stacked experts' [E, N, K] (out, in) can run through the
    kernels on this machine (which compiles them, once, if it has not)."""
    return (w.dim() in (2, 3) and w.dtype == torch.bfloat16 and w.is_cpu
            and w.shape[-2] % COLUMN_BLOCK == 0 and w.shape[-1] % 2 == 0
            and enabled and _library() is not None)


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [..., N, K] -> [..., N / 64, K / 2, 64, 2], the layout `cpu_kernels.cpp` reads."""
    *lead, N, K = w.shape
    return (w.reshape(*lead, N // COLUMN_BLOCK, COLUMN_BLOCK, K // 2, 2)
            .transpose(-3, -2).contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 times a `pack`ed [N, K] weight -> [..., N], as F.linear. The op
    exists once `can_pack` has said yes (loading the kernels registers it)."""
    return torch.ops.dsv4_cpu.linear(x, packed)


def pack_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """w13 [E, 2 inter, K] (w1's rows, then w3's) packed for `experts_swiglu`: each block of
    64 columns holds 32 of w1 and the same 32 of w3."""
    E, N, K = w13.shape
    half = COLUMN_BLOCK // 2
    gate, up = (w.reshape(E, N // COLUMN_BLOCK, half, K) for w in w13.chunk(2, dim=1))
    return pack(torch.cat([gate, up], dim=2).reshape(E, N, K))


def padded_experts(rows: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor,
                   w13_packed: torch.Tensor, w2_packed: torch.Tensor,
                   limit: float | None) -> torch.Tensor:
    """The routed experts over rows laid out [E, C, dim] (`MoE._padded`), expert e's first
    counts[e] (int64) rows, scale [E, C, 1] their routing weights: `experts_swiglu` then
    w2, as the torch op `dsv4_cpu::padded_experts` (no Python inside a compiled graph).
    -> [E, C, dim], rows past each expert's count unset."""
    return torch.ops.dsv4_cpu.padded_experts(rows, scale, counts, w13_packed, w2_packed, limit)


def experts_matmul(x: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Rows x [M, K] sorted by expert, counts[e] of expert e, times their expert's weights
    (`pack`ed [E, N / 64, K / 2, 64, 2]), bf16 -> [M, N]. The last dim of x must be
    contiguous."""
    return _run(_library().dsv4_experts_matmul, x, counts, packed, COLUMN_BLOCK)


def experts_swiglu(x: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor,
                   scale: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(x w1^T) * (x w3^T) * scale for rows x [M, K] sorted by expert as in
    `experts_matmul`, w1 clamped to at most `limit` and w3 to +-limit first; rounded to bf16
    where torch's bf16 ops on the unfused products round. packed: `pack_gate_up`; scale
    [M, 1]: each row's routing weight. -> [M, inter]."""
    # torch clamps bf16 values against the limit rounded to bf16
    bound = float("inf") if limit is None else torch.tensor(limit).bfloat16().item()
    return _run(_library().dsv4_experts_swiglu, x, counts, packed, COLUMN_BLOCK // 2,
                scale.to(torch.bfloat16), bound)


def _run(kernel, x, counts, packed, out_per_block, scale=None, limit=0.0) -> torch.Tensor:
    E, blocks, half_k = packed.shape[:3]
    K = 2 * half_k
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[-1] != K or x.stride(-1) != 1:
        raise ValueError(f"experts_matmul needs [rows, {K}] bf16 rows, contiguous in their "
                         f"last dim, got {x.dtype} {tuple(x.shape)} with strides {x.stride()}")
    if packed.dtype != torch.bfloat16 or not packed.is_contiguous():
        raise ValueError("experts_matmul needs the weights as `pack` returns them: contiguous "
                         f"bf16, got {packed.dtype} with strides {packed.stride()}")
    # the kernel trusts the counts: rows it would read or write past x's are refused here
    rows = counts.tolist()
    if len(rows) != E or min(rows, default=0) < 0 or sum(rows) > len(x) or \
            (scale is not None and len(scale) != len(x)):
        raise ValueError(f"expert row counts {rows} do not fit rows {tuple(x.shape)} (scale "
                         f"{None if scale is None else tuple(scale.shape)}) for {E} experts")
    counts = counts.to(torch.int64).contiguous()
    out = x.new_empty(len(x), blocks * out_per_block)
    first_row = counts.cumsum(0) - counts
    # where each expert's rows start in x, out (and scale), in elements; held in a list
    # until the call returns, as the kernel gets only their addresses
    starts = [first_row * t.stride(0) for t in (x, out, *([] if scale is None else [scale]))]
    args = [x.data_ptr(), starts[0].data_ptr(), x.stride(0), packed.data_ptr(),
            counts.data_ptr(), E, K, blocks * COLUMN_BLOCK, out.data_ptr(),
            starts[1].data_ptr(), out.stride(0)]
    if scale is not None:
        args += [scale.data_ptr(), starts[2].data_ptr(), scale.stride(0), limit]
    kernel(*args)
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not _cpu_gains():
        return None
    try:
        lib = ctypes.CDLL(str(_build()))  # registers the dsv4_cpu:: torch ops
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        warnings.warn(f"dsv4: could not build the CPU kernels ({detail}); the model uses "
                      "torch's products, about 2x slower at decode batch sizes. Install a C++ "
                      "compiler (or set CXX) to get them.", stacklevel=2)
        return None
    torch.library.register_fake("dsv4_cpu::linear")(
        lambda x, packed: x.new_empty(*x.shape[:-1], packed.shape[0] * COLUMN_BLOCK))
    torch.library.register_fake("dsv4_cpu::padded_experts")(
        lambda rows, scale, counts, w13, w2, limit:
        rows.new_empty(*rows.shape[:2], w2.shape[1] * COLUMN_BLOCK))
    matmul = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_int64]
    lib.dsv4_experts_matmul.argtypes = matmul
    lib.dsv4_experts_swiglu.argtypes = matmul + [ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_int64, ctypes.c_float]
    lib.dsv4_experts_matmul.restype = lib.dsv4_experts_swiglu.restype = None
    return lib


def _cpu_gains() -> bool:
    """AVX-512 BF16 without AMX: where the kernels were measured faster (Zen 4). With AMX
    (Intel since Sapphire Rapids) oneDNN multiplies bf16 on the tile unit, which these kernels
    do not use; torch's products stay there until measured."""
    def has(feature: str) -> bool:
        return getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)()
    return has("avx512_bf16") and not has("amx_tile")


def _build() -> Path:
    """Compile the kernels once per source, command, compiler and torch; -> the library."""
    compiler = os.environ.get("CXX", "c++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    # the libraries after the source, or a linker that drops unneeded ones drops them
    command = [compiler, *FLAGS, str(SOURCE), *_torch_flags()]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *command, version,
                                     torch.__version__]).encode())
    cache = Path(os.environ.get("DSV4_CACHE_DIR")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsv4")
    target = cache / "kernels" / f"cpu_kernels_{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # built under a temporary name and renamed: processes that build at once never load
        # a half-written file
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([*command, "-o", str(built)], capture_output=True, text=True,
                           check=True)
            os.replace(built, target)
    return target


def _torch_flags() -> list[str]:
    """Compile against this torch's headers and link its libraries (for the torch ops)."""
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}",
            "-ltorch_cpu", "-lc10"]
