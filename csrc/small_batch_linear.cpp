// CPU kernel of lightning_spec::small_batch_linear: y = x @ W^T (+ b) in float32 for M <= 16 rows (a decode step,
// a verification batch). ATen's GEMM runs M = 2..8 at 2-3x its M = 1 time on the build machine; here each tile of
// NR weight rows x MR input rows streams its weight rows once for all MR rows, so M rows cost about one.
// Every output is the same k-ordered 16- (8-) lane FMA sum, a fixed lane reduction and a sequential tail, whatever
// the tile, M or thread split: a row's result does not depend on the other rows, so in a k-token verification each
// token gets bit for bit the layer outputs it gets when decoded alone.
#include "small_batch_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_isa.h"

namespace lightning_spec {
namespace {

constexpr int64_t kMaxRows = 16;

struct Operands {
  const float* x;  // [M, K]
  const float* w;  // [N, K]
  float* y;        // [M, N]
  int64_t M, N, K;
};

float tail_dot(const float* x, const float* w, int64_t k, int64_t K) {
  float tail = 0.f;
  for (; k < K; ++k) tail += x[k] * w[k];
  return tail;
}

void generic_rows(const Operands& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) p.y[m * p.N + n] = tail_dot(p.x + m * p.K, p.w + n * p.K, 0, p.K);
}

#ifdef LS_X86
// Rows n + 2 NR .. n + 3 NR - 1 of the weight, to prefetch into L2 while this tile computes, or null past the end.
// With more than one input row the FMAs between weight loads fill the out-of-order window and the hardware
// prefetcher falls behind. Measured streaming SmolLM2's 538 MB of weights on the AMX Xeon (ms at M = 1 / 3 / 5):
// no prefetch 22 / 31 / 34, the next tile into L1 24 / 28 / 29, two tiles ahead into L2 23 / 24 / 27.
template <int NR>
const float* next_tile(const Operands& p, int64_t n) {
  return n + 3 * NR <= p.N ? p.w + (n + 2 * NR) * p.K : nullptr;
}

template <int NR, int MR>
LS_AVX512 void tile_avx512(const Operands& p, int64_t n, int64_t m) {
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_setzero_ps();
  const float* next = next_tile<NR>(p, n);
  int64_t k = 0;
  for (; k + 16 <= p.K; k += 16) {
    if (next)  // that tile's NR x K weights, NR cache lines per step: spread over this tile's K / 16 steps
      for (int i = 0; i < NR; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + k * NR + 16 * i), _MM_HINT_T1);
    __m512 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm512_loadu_ps(p.x + (m + r) * p.K + k);
    for (int i = 0; i < NR; ++i) {
      const __m512 wv = _mm512_loadu_ps(p.w + (n + i) * p.K + k);
      for (int r = 0; r < MR; ++r) acc[i][r] = _mm512_fmadd_ps(xv[r], wv, acc[i][r]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r)
      p.y[(m + r) * p.N + n + i] = _mm512_reduce_add_ps(acc[i][r]) + tail_dot(p.x + (m + r) * p.K, p.w + (n + i) * p.K, k, p.K);
}

template <int NR, int MR>
LS_AVX2 void tile_avx2(const Operands& p, int64_t n, int64_t m) {
  __m256 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_setzero_ps();
  const float* next = next_tile<NR>(p, n);
  int64_t k = 0;
  for (; k + 8 <= p.K; k += 8) {
    if (next && k % 16 == 0)
      for (int i = 0; i < NR; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + k * NR + 16 * i), _MM_HINT_T1);
    __m256 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm256_loadu_ps(p.x + (m + r) * p.K + k);
    for (int i = 0; i < NR; ++i) {
      const __m256 wv = _mm256_loadu_ps(p.w + (n + i) * p.K + k);
      for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_fmadd_ps(xv[r], wv, acc[i][r]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r)
      p.y[(m + r) * p.N + n + i] = hsum8(acc[i][r]) + tail_dot(p.x + (m + r) * p.K, p.w + (n + i) * p.K, k, p.K);
}

template <int NR, int MR>
void tile(const Operands& p, Isa isa, int64_t n, int64_t m) {
  if (isa == Isa::kAvx2) return tile_avx2<NR, MR>(p, n, m);
  tile_avx512<NR, MR>(p, n, m);
}

// Four rows per tile (16 accumulators + 4 inputs + a weight vector fit AVX-512's 32 registers); the last 5 or 6
// rows as one tile (up to 24 + 6 + 1), since a second pass over the weight tile costs more than its FMAs
// (M = 5: 27 -> 25 ms over SmolLM2's weights).
template <int NR>
void tile_rows(const Operands& p, Isa isa, int64_t n) {
  int64_t m = 0;
  for (; p.M - m > 6; m += 4) tile<NR, 4>(p, isa, n, m);
  switch (p.M - m) {
    case 6: return tile<NR, 6>(p, isa, n, m);
    case 5: return tile<NR, 5>(p, isa, n, m);
    case 4: return tile<NR, 4>(p, isa, n, m);
    case 3: return tile<NR, 3>(p, isa, n, m);
    case 2: return tile<NR, 2>(p, isa, n, m);
    case 1: return tile<NR, 1>(p, isa, n, m);
    default: return;
  }
}

// 6 to 12 rows (a wider tree's verification) in one pass over the weights: tiles of 2 channels x 6-8 rows and of
// 1 channel x 9-12 rows fit AVX-512's 32 registers where 4-channel tiles take a second pass (AVX2's 16 would spill).
// Streaming SmolLM2's weights at 6 / 7 / 8 / 9 / 12 rows, in times the one-row time: 4-channel tiles 1.15 / 1.30 /
// 1.31 / 1.33 / 1.56, these 1.10 / 1.24 / 1.28 / 1.27 / 1.33.
void simd_rows(const Operands& p, Isa isa, int64_t n0, int64_t n1) {
  int64_t n = n0;
  const bool wide = isa != Isa::kAvx2;
  if (wide && p.M >= 6 && p.M <= 8) {
    for (; n + 2 <= n1; n += 2) switch (p.M) {
      case 6: tile<2, 6>(p, isa, n, 0); break;
      case 7: tile<2, 7>(p, isa, n, 0); break;
      default: tile<2, 8>(p, isa, n, 0);
    }
  } else if (wide && p.M >= 9 && p.M <= 12) {
    for (; n < n1; ++n) switch (p.M) {
      case 9: tile<1, 9>(p, isa, n, 0); break;
      case 10: tile<1, 10>(p, isa, n, 0); break;
      case 11: tile<1, 11>(p, isa, n, 0); break;
      default: tile<1, 12>(p, isa, n, 0);
    }
  }
  for (; n + 4 <= n1; n += 4) tile_rows<4>(p, isa, n);
  for (; n < n1; ++n) tile_rows<1>(p, isa, n);
}
#endif

}  // namespace

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "small_batch_linear: x must be float32 [..., K], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "small_batch_linear: weight must be float32 [N, K], got ", weight.scalar_type(), " ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "small_batch_linear: x has ", x.size(-1), " input features, weight has K = ", K);
  TORCH_CHECK(x.device() == weight.device(), "small_batch_linear: weight must be on x's device ", x.device());
  if (bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N && bias->device() == x.device(),
                "small_batch_linear: bias must be float32 [", N, "] on x's device, got ", bias->sizes());
  const auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  TORCH_CHECK(M <= kMaxRows, "small_batch_linear: at most ", kMaxRows, " rows, got ", M);
  const auto w = weight.contiguous();
  auto y = at::empty({M, N}, x2.options());
  const Operands p{x2.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, N, K};
  if (M > 0 && N > 0) {
    const Isa isa = select_isa();
    const int64_t tiles = (N + 3) / 4;
    // A thread per ~64K multiply-adds at least: below that, waking a second thread costs more than it saves. (2^19
    // suited an AMD EPYC; on the AMX Xeon it left SmolLM2's 576-row projections on one core, and a decode step took
    // 65.0 ms where 2^16 takes 56.8.)
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (4 * std::max<int64_t>(K, 1) * M));
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4);
#ifdef LS_X86
      if (isa != Isa::kGeneric) return simd_rows(p, isa, n0, n1);
#endif
      generic_rows(p, n0, n1);
    });
  }
  if (bias) y.add_(*bias);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return y.reshape(out_shape);
}

}  // namespace lightning_spec
