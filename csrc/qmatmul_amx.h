// AMX paths of lightning_spec::quantized_linear at up to 16 rows (qmatmul_amx.cpp).
#pragma once
#include <cstdint>

#include "qmatmul_checks.h"

namespace lightning_spec {

// Fewest rows the bf16-parts and w8a8 path takes: below, the streaming kernels are faster (measured on the AMX Xeon:
// w8a8 from 3 rows, int8 from 5, int4 from 6; the streaming kernels' 4-row tiles need a second pass over the weight
// from 5), unless the fixed-point paths below take them.
inline int64_t amx_min_rows(Scheme scheme) { return scheme == Scheme::kW8A8 ? 3 : scheme == Scheme::kInt8 ? 5 : 6; }
constexpr int64_t kAmxMaxRows = 16;  // a tile's 64-byte rows hold 16 rows' fp32 results

// y [M, N] = x [M, K] @ dequantize(packed, scales, zeros)^T, amx_min_rows <= M <= kAmxMaxRows, on a CPU where
// select_isa() is Isa::kAmx. Returns false, having written nothing, when x holds an inf, a NaN or a magnitude of 2^100
// or more (its unscaled products could overflow): the caller's float kernels take those.
bool amx_quantized_linear(const float* x, const void* packed, const float* scales, const uint8_t* zeros, Scheme scheme,
                          int64_t group, float* y, int64_t M, int64_t N, int64_t K);

// int8 at 1-4 rows (int8 codes against x in fixed point: four int8 digits per input, a tile column each), K < 2^17.
constexpr int64_t kAmxFixedPointRows = 4;
constexpr int64_t kAmxFixedPointMaxK = int64_t{1} << 17;  // |code x digit| <= 2^14: K of them fit an int32 sum

// int8: y [M, N] = x [M, K] @ dequantize(packed, scales)^T, 1 <= M <= kAmxFixedPointRows, K < kAmxFixedPointMaxK, on
// a CPU where select_isa() is Isa::kAmx. Each row of x is rounded to integer multiples of a power of two that puts its
// largest |x| under 2^30 of them: inputs of at least 1/64 of the largest stay exact, the rest move by at most 2^-30 of
// it. The products and their sums are exact integers, scaled once per row and channel. Returns false, having written
// nothing, when x holds an inf or a NaN.
bool amx_int8_fixed_point_linear(const float* x, const int8_t* packed, const float* scales, float* y, int64_t M,
                                 int64_t N, int64_t K);

// w8a8: y [M, N] = (codes [M, K] @ packed^T in int32) * x_scales[m] * scales[n], 1 <= M <= kAmxMaxRows, as the
// streaming kernels compute it (every sum exact), on a CPU where select_isa() is Isa::kAmx.
void amx_w8a8_linear(const int8_t* codes, const float* x_scales, const int8_t* packed, const float* scales, float* y,
                     int64_t M, int64_t N, int64_t K);

}  // namespace lightning_spec
