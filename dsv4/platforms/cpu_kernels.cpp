// Matrix products in bf16 for CPUs with AVX-512 BF16 (see cpu_kernels.py): the routed
// experts' (the torch op dsv4_cpu::padded_experts, and C functions over rows sorted by expert
// that the eager path calls through ctypes) and dense ones (the torch op dsv4_cpu::linear).
// Compiled graphs call the torch ops from C++, without Python.
//
// out[e][r] = x[e][r] . W[e]^T for the first counts[e] rows r of each expert e, with float32
// sums rounded once to bf16 (round to nearest even), as torch's bf16 matmuls do.
//
// dsv4_experts_swiglu fuses the SwiGLU into the first product: its W holds w1 and w3 with
// each 64-column block made of 32 gate columns then the 32 matching up columns
// (`pack_gate_up`), and each row's output is silu(gate) * up * scale over those 32, rounded to
// bf16 at the same points as torch's bf16 ops on the unfused product.
//
// W is packed by `pack` in cpu_kernels.py as [E][N / 64][K / 2][64][2]: for each block of 64
// output columns, each pair of input dims k, k + 1 holds 64 (column, pair) values, which are
// the four 512-bit operands one vdpbf16ps step of 64 columns needs, contiguous. A tile of R
// rows x 64 columns keeps its 4R float32 sums in registers for the whole K loop; each input
// pair is broadcast once per row and each weight vector loaded once per tile.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <stdint.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int kMaxRows = 6;  // 4 x 6 accumulators + 4 weight vectors + 1 broadcast < 32 zmm

// acc[r][j] = sum over k of x[r][k] * w[k][16 j .. 16 j + 15], float32
template <int R>
inline void accumulate(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K,
                       __m512 (&acc)[R][4]) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    const uint16_t* wk = w + kp * 128;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(wk);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(wk + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(wk + 64);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(wk + 96);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, x + r * ldx + 2 * kp, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
    }
  }
}

inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

inline __m512 from_bf16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline __m512 round_bf16(__m512 v) { return from_bf16(to_bf16(v)); }

// e^v, within a few float32 ulps: e^v = 2^n e^f with n = round(v / ln 2), |f| <= ln 2 / 2,
// e^f by its Taylor polynomial to degree 7 (ln 2 split in two so that f keeps its bits)
inline __m512 exp_ps(__m512 v) {
  v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

struct Store {  // the product, rounded to bf16
  template <int R>
  static void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* out,
                   int64_t ldo, const uint16_t*, int64_t, float) {
    __m512 acc[R][4];
    accumulate<R>(x, ldx, w, K, acc);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_si256((__m256i*)(out + r * ldo + 16 * j), to_bf16(acc[r][j]));
  }
  static constexpr int kOutColumns = 64;
};

struct SwiGLU {  // silu(gate) * up * scale of a gate-up block; limit clamps gate and up
  template <int R>
  static void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* out,
                   int64_t ldo, const uint16_t* scale, int64_t lds, float limit) {
    __m512 acc[R][4];
    accumulate<R>(x, ldx, w, K, acc);
    const __m512 hi = _mm512_set1_ps(limit), lo = _mm512_set1_ps(-limit);
    for (int r = 0; r < R; ++r) {
      const __m512 s = from_bf16(_mm256_set1_epi16((short)scale[r * lds]));
      for (int j = 0; j < 2; ++j) {
        __m512 gate = round_bf16(acc[r][j]), up = round_bf16(acc[r][j + 2]);
        gate = round_bf16(_mm512_min_ps(gate, hi));  // +inf when there is no limit
        up = round_bf16(_mm512_max_ps(_mm512_min_ps(up, hi), lo));
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate));
        const __m512 silu = round_bf16(_mm512_div_ps(gate, _mm512_add_ps(e, _mm512_set1_ps(1))));
        const __m512 h = round_bf16(_mm512_mul_ps(silu, up));
        _mm256_storeu_si256((__m256i*)(out + r * ldo + 16 * j), to_bf16(_mm512_mul_ps(h, s)));
      }
    }
  }
  static constexpr int kOutColumns = 32;
};

template <class Op>
void rows(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* out,
          int64_t ldo, const uint16_t* scale, int64_t lds, float limit, int64_t n) {
  int64_t r = 0;
  for (; r + kMaxRows <= n; r += kMaxRows)
    Op::template tile<kMaxRows>(x + r * ldx, ldx, w, K, out + r * ldo, ldo, scale + r * lds,
                                lds, limit);
  x += r * ldx, out += r * ldo, scale += r * lds;
  switch (n - r) {
    case 1: Op::template tile<1>(x, ldx, w, K, out, ldo, scale, lds, limit); break;
    case 2: Op::template tile<2>(x, ldx, w, K, out, ldo, scale, lds, limit); break;
    case 3: Op::template tile<3>(x, ldx, w, K, out, ldo, scale, lds, limit); break;
    case 4: Op::template tile<4>(x, ldx, w, K, out, ldo, scale, lds, limit); break;
    case 5: Op::template tile<5>(x, ldx, w, K, out, ldo, scale, lds, limit); break;
    default: break;
  }
}

// Work is split over (expert, block of 64 packed columns) pairs, dealt round-robin to the
// threads so that each gets its share of every expert whatever the counts.
// packed_stride: elements from one expert's packed weights to the next (0: one shared W)
template <class Op>
void experts(const uint16_t* x, const int64_t* x_offsets, int64_t ldx, const uint16_t* packed,
             int64_t packed_stride, const int64_t* counts, int64_t num_experts, int64_t K,
             int64_t N, uint16_t* out, const int64_t* out_offsets, int64_t ldo,
             const uint16_t* scale, const int64_t* scale_offsets, int64_t lds, float limit) {
  const int64_t blocks = N / 64;
#pragma omp parallel for schedule(static, 1)
  for (int64_t task = 0; task < num_experts * blocks; ++task) {
    const int64_t e = task / blocks, block = task % blocks;
    if (counts[e] <= 0) continue;
    rows<Op>(x + x_offsets[e], ldx, packed + e * packed_stride + block * K * 64, K,
             out + out_offsets[e] + block * Op::kOutColumns, ldo,
             scale ? scale + scale_offsets[e] : nullptr, lds, limit, counts[e]);
  }
}

// x [..., K] times one packed W [N / 64, K / 2, 64, 2] -> [..., N]. The rows go in chunks
// that share W, so that threads split the rows as well as the column blocks.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16 &&
                  x.device().is_cpu() && packed.dim() == 4 && packed.is_contiguous() &&
                  x.size(-1) == 2 * packed.size(1),
              "dsv4_cpu::linear: bf16 CPU rows of 2 x packed.size(1) values and a contiguous "
              "[N / 64, K / 2, 64, 2] packed weight, got ", x.sizes(), " and ", packed.sizes());
  const int64_t K = x.size(-1), N = packed.size(0) * 64;
  at::Tensor rows = x.reshape({-1, K});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  const int64_t M = rows.size(0), chunk = 4 * kMaxRows;
  at::Tensor out = at::empty({M, N}, x.options());
  const int64_t chunks = (M + chunk - 1) / chunk;
  std::vector<int64_t> x_offsets(chunks), out_offsets(chunks), counts(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    x_offsets[c] = c * chunk * rows.stride(0);
    out_offsets[c] = c * chunk * N;
    counts[c] = std::min(chunk, M - c * chunk);
  }
  experts<Store>(reinterpret_cast<const uint16_t*>(rows.data_ptr()), x_offsets.data(),
                 rows.stride(0), reinterpret_cast<const uint16_t*>(packed.data_ptr()), 0,
                 counts.data(), chunks, K, N, reinterpret_cast<uint16_t*>(out.data_ptr()),
                 out_offsets.data(), N, nullptr, nullptr, 0, 0.0f);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  return out.view(sizes);
}

// The routed experts over rows laid out [E, C, D] (MoE._padded): expert e's first counts[e]
// rows, scale [E, C, 1] their routing weights -> [E, C, D'] (other rows unset). The SwiGLU
// product, then w2, each expert's own rows only; as a torch op, called from a compiled
// graph's C++ without Python.
at::Tensor padded_experts(const at::Tensor& rows, const at::Tensor& scale,
                          const at::Tensor& counts, const at::Tensor& w13_packed,
                          const at::Tensor& w2_packed, std::optional<double> limit) {
  const int64_t E = rows.size(0), C = rows.size(1), D = rows.size(2);
  TORCH_CHECK(rows.scalar_type() == at::kBFloat16 && rows.is_contiguous() &&
                  scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() &&
                  scale.numel() == E * C && counts.scalar_type() == at::kLong &&
                  counts.is_contiguous() && counts.numel() == E &&
                  w13_packed.is_contiguous() && w2_packed.is_contiguous() &&
                  w13_packed.size(0) == E && w2_packed.size(0) == E &&
                  2 * w13_packed.size(2) == D && 2 * w2_packed.size(2) == 32 * w13_packed.size(1),
              "dsv4_cpu::padded_experts: contiguous bf16 rows [E, C, D], scale [E, C, 1], int64 "
              "counts [E] and the packed weights of E experts, got ", rows.sizes(), ", ",
              scale.sizes(), ", ", counts.sizes(), ", ", w13_packed.sizes(), ", ",
              w2_packed.sizes());
  const int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(count[e] >= 0 && count[e] <= C, "dsv4_cpu::padded_experts: expert ", e,
                " has ", count[e], " rows, outside [0, ", C, "]");
  const int64_t N13 = w13_packed.size(1) * 64, inter = N13 / 2, N2 = w2_packed.size(1) * 64;
  at::Tensor h = at::empty({E, C, inter}, rows.options());
  at::Tensor out = at::empty({E, C, N2}, rows.options());
  std::vector<int64_t> x_offsets(E), h_offsets(E), s_offsets(E), out_offsets(E);
  for (int64_t e = 0; e < E; ++e) {
    x_offsets[e] = e * C * D, h_offsets[e] = e * C * inter;
    s_offsets[e] = e * C, out_offsets[e] = e * C * N2;
  }
  // torch clamps bf16 values against the limit rounded to bf16
  const float bound = limit ? static_cast<float>(c10::BFloat16(static_cast<float>(*limit)))
                            : INFINITY;
  auto bf16 = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  experts<SwiGLU>(bf16(rows), x_offsets.data(), D, bf16(w13_packed), D * N13, count, E, D, N13,
                  bf16(h), h_offsets.data(), inter, bf16(scale), s_offsets.data(), 1, bound);
  experts<Store>(bf16(h), h_offsets.data(), inter, bf16(w2_packed), inter * N2, count, E, inter,
                 N2, bf16(out), out_offsets.data(), N2, nullptr, nullptr, 0, 0.0f);
  return out;
}

}  // namespace

// x_offsets[e], out_offsets[e], scale_offsets[e]: where expert e's first row starts (in
// elements); ldx, ldo, lds: the row strides. N counts the packed columns.
extern "C" void dsv4_experts_matmul(const uint16_t* x, const int64_t* x_offsets, int64_t ldx,
                                    const uint16_t* packed, const int64_t* counts,
                                    int64_t num_experts, int64_t K, int64_t N, uint16_t* out,
                                    const int64_t* out_offsets, int64_t ldo) {
  experts<Store>(x, x_offsets, ldx, packed, K * N, counts, num_experts, K, N, out, out_offsets,
                 ldo, nullptr, nullptr, 0, 0.0f);
}

extern "C" void dsv4_experts_swiglu(const uint16_t* x, const int64_t* x_offsets, int64_t ldx,
                                    const uint16_t* packed, const int64_t* counts,
                                    int64_t num_experts, int64_t K, int64_t N, uint16_t* out,
                                    const int64_t* out_offsets, int64_t ldo,
                                    const uint16_t* scale, const int64_t* scale_offsets,
                                    int64_t lds, float limit) {
  experts<SwiGLU>(x, x_offsets, ldx, packed, K * N, counts, num_experts, K, N, out,
                  out_offsets, ldo, scale, scale_offsets, lds, limit);
}

TORCH_LIBRARY(dsv4_cpu, m) {
  m.def("linear(Tensor x, Tensor packed) -> Tensor");
  m.def("padded_experts(Tensor rows, Tensor scale, Tensor counts, Tensor w13_packed, "
        "Tensor w2_packed, float? limit) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv4_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("padded_experts", &padded_experts);
}
