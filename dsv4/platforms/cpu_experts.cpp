// Routed experts' matrix products in bf16 for CPUs with AVX-512 BF16 (see cpu_experts.py).
//
// out[e][r] = x[e][r] . W[e]^T for the first counts[e] rows r of each expert e, with float32
// sums rounded once to bf16 (round to nearest even), as torch's bf16 matmuls do.
//
// W is packed by `pack` in cpu_experts.py as [E][N / 64][K / 2][64][2]: for each block of 64
// output columns, each pair of input dims k, k + 1 holds 64 (column, pair) values, which are
// the four 512-bit operands one vdpbf16ps step of 64 columns needs, contiguous. A tile of R
// rows x 64 columns keeps its 4R float32 sums in registers for the whole K loop; each input
// pair is broadcast once per row and each weight vector loaded once per tile.
#include <immintrin.h>
#include <stdint.h>

namespace {

constexpr int kMaxRows = 6;  // 4 x 6 accumulators + 4 weight vectors + 1 broadcast < 32 zmm

template <int R>
void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* out,
          int64_t ldo) {
  __m512 acc[R][4];
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
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      _mm256_storeu_si256((__m256i*)(out + r * ldo + 16 * j),
                          (__m256i)_mm512_cvtneps_pbh(acc[r][j]));
}

void rows(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* out,
          int64_t ldo, int64_t n) {
  int64_t r = 0;
  for (; r + kMaxRows <= n; r += kMaxRows)
    tile<kMaxRows>(x + r * ldx, ldx, w, K, out + r * ldo, ldo);
  x += r * ldx, out += r * ldo;
  switch (n - r) {
    case 1: tile<1>(x, ldx, w, K, out, ldo); break;
    case 2: tile<2>(x, ldx, w, K, out, ldo); break;
    case 3: tile<3>(x, ldx, w, K, out, ldo); break;
    case 4: tile<4>(x, ldx, w, K, out, ldo); break;
    case 5: tile<5>(x, ldx, w, K, out, ldo); break;
    default: break;
  }
}

}  // namespace

// x_offsets[e], out_offsets[e]: where expert e's first row starts (in elements); ldx, ldo:
// the row strides. Work is split over (expert, block of 64 columns) pairs, dealt round-robin
// to the threads so that each gets its share of every expert whatever the counts.
extern "C" void dsv4_experts_matmul(const uint16_t* x, const int64_t* x_offsets, int64_t ldx,
                                    const uint16_t* packed, const int64_t* counts,
                                    int64_t num_experts, int64_t K, int64_t N, uint16_t* out,
                                    const int64_t* out_offsets, int64_t ldo) {
  const int64_t blocks = N / 64;
#pragma omp parallel for schedule(static, 1)
  for (int64_t task = 0; task < num_experts * blocks; ++task) {
    const int64_t e = task / blocks, block = task % blocks;
    if (counts[e] <= 0) continue;
    rows(x + x_offsets[e], ldx, packed + (e * blocks + block) * K * 64, K,
         out + out_offsets[e] + block * 64, ldo, counts[e]);
  }
}
