// CUDA kernels of lightning_spec::quantized_linear (numerics: lightning_spec/quant/numerics.py).
// Small M (decode / verification, M <= 16): each warp streams the packed rows of kChannelsPerWarp output channels
// once, 16 bytes per lane per load, decodes each chunk to fp32 in registers once and applies it to all M rows
// (the row count is a template bound, so the accumulators stay in registers), then a warp-shuffle reduction.
// Large M: dequantize to fp32 and let cuBLAS multiply (the host side, qmatmul_cuda.cpp). w8a8 takes per-token int8
// activation codes made on the host side and accumulates in int32 with dp4a.
// Products use explicit fmaf: the extension builds with --fmad=false (verify_tree's bit-exactness), which would
// otherwise split every multiply-add here.
// No torch headers: `nvcc -c -std=c++17 -arch=sm_90a csrc/qmatmul_kernels.cu` compiles it standalone.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace lightning_spec {

constexpr int kMaxStreamRows = 16;
constexpr int kWarpsPerBlock = 8;
constexpr int kChannelsPerWarp = 2;  // each x chunk read from L1 serves two weight rows
constexpr int kChannelsPerBlock = kWarpsPerBlock * kChannelsPerWarp;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The weight code of input k in channel n's packed row, minus its zero point, times its scale (int4 layouts:
// 32-input chunks of 16 bytes, byte j = input j (low nibble) and input j + 16 (high nibble)).
__device__ __forceinline__ float int4_weight(const uint8_t* row, const float* scales, const uint8_t* zeros, int64_t n,
                                             int64_t k, int64_t groups, int64_t group, bool asym) {
  const uint8_t byte = row[(k / 32) * 16 + (k % 16)];
  const int q = (k % 32) < 16 ? (byte & 0x0F) : (byte >> 4);
  const int64_t g = k / group;
  const int z = asym ? zeros[n * groups + g] : 8;
  return float(q - z) * scales[n * groups + g];
}

// kScheme 0: int8, one 16-byte load = 16 inputs (scaled per channel at the end); 1 int4, 2 int4_asym: one 16-byte
// load = one 32-input chunk inside one group (groups are 32, 64 or 128), decoded as (q - z) * scale.
// Needs 16-byte aligned x rows and packed rows (the host side makes sure) and K % 16 == 0 for int8.
template <int kScheme, int kRows>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    weight_only_stream_kernel(const float* __restrict__ x, const uint8_t* __restrict__ packed,
                              const float* __restrict__ scales, const uint8_t* __restrict__ zeros, float* __restrict__ y,
                              int M, int64_t N, int64_t K, int64_t group) {
  constexpr int kChunk = kScheme == 0 ? 16 : 32;
  const int lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * kChannelsPerWarp;
  if (n0 >= N) return;
  const int64_t row_bytes = kScheme == 0 ? K : K / 2;
  const int64_t chunks = K / kChunk, groups = K / group;
  float acc[kRows][kChannelsPerWarp];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int c = 0; c < kChannelsPerWarp; ++c) acc[r][c] = 0.f;

  for (int64_t chunk = lane; chunk < chunks; chunk += 32) {
    float w[kChannelsPerWarp][kChunk];
#pragma unroll
    for (int c = 0; c < kChannelsPerWarp; ++c) {
      const int64_t n = n0 + c < N ? n0 + c : N - 1;  // a missing last channel repeats the one before; not stored
      const uint4 bits = __ldg(reinterpret_cast<const uint4*>(packed + n * row_bytes) + chunk);
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&bits);
      if constexpr (kScheme == 0) {
#pragma unroll
        for (int j = 0; j < 16; ++j) w[c][j] = float(static_cast<int8_t>(bytes[j]));
      } else {
        const int64_t g = n * groups + chunk * 32 / group;
        const float scale = __ldg(scales + g);
        const int zero = kScheme == 2 ? __ldg(zeros + g) : 8;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          w[c][j] = float(int(bytes[j] & 0x0F) - zero) * scale;
          w[c][j + 16] = float(int(bytes[j] >> 4) - zero) * scale;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= M) break;
      const float4* xr = reinterpret_cast<const float4*>(x + r * K + chunk * kChunk);
#pragma unroll
      for (int j = 0; j < kChunk / 4; ++j) {
        const float4 v = __ldg(xr + j);
#pragma unroll
        for (int c = 0; c < kChannelsPerWarp; ++c) {
          float a = acc[r][c];
          a = fmaf(v.x, w[c][4 * j], a);
          a = fmaf(v.y, w[c][4 * j + 1], a);
          a = fmaf(v.z, w[c][4 * j + 2], a);
          acc[r][c] = fmaf(v.w, w[c][4 * j + 3], a);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= M) break;
#pragma unroll
    for (int c = 0; c < kChannelsPerWarp; ++c) {
      const float total = warp_sum(acc[r][c]);
      if (lane == 0 && n0 + c < N) y[r * N + n0 + c] = kScheme == 0 ? total * scales[n0 + c] : total;
    }
  }
}

// int8 with K % 16 != 0 (or unaligned rows): one byte per lane per step, coalesced across the warp.
template <int kRows>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    int8_bytewise_kernel(const float* __restrict__ x, const int8_t* __restrict__ packed, const float* __restrict__ scales,
                         float* __restrict__ y, int M, int64_t N, int64_t K) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  const int8_t* row = packed + n * K;
  for (int64_t k = lane; k < K; k += 32) {
    const float w = float(row[k]);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < M) acc[r] = fmaf(x[r * K + k], w, acc[r]);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= M) break;
    const float total = warp_sum(acc[r]);
    if (lane == 0) y[r * N + n] = total * scales[n];
  }
}

// w8a8: int8 codes times int8 codes, int32 sums (dp4a), scaled by the token's and the channel's scale. kVector:
// 16 bytes per lane per load (K % 16 == 0, aligned rows), else one byte.
template <int kRows, bool kVector>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    w8a8_stream_kernel(const int8_t* __restrict__ xq, const float* __restrict__ xs, const int8_t* __restrict__ packed,
                       const float* __restrict__ scales, float* __restrict__ y, int M, int64_t N, int64_t K) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  int acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0;
  const int8_t* row = packed + n * K;
  if constexpr (kVector) {
    for (int64_t k = 16 * lane; k < K; k += 512) {
      const int4 w = __ldg(reinterpret_cast<const int4*>(row + k));
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r >= M) break;
        const int4 a = __ldg(reinterpret_cast<const int4*>(xq + r * K + k));
        acc[r] = __dp4a(a.w, w.w, __dp4a(a.z, w.z, __dp4a(a.y, w.y, __dp4a(a.x, w.x, acc[r]))));
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32)
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < M) acc[r] += int(xq[r * K + k]) * int(row[k]);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= M) break;
    const int total = warp_sum(acc[r]);
    if (lane == 0) y[r * N + n] = float(total) * xs[r] * scales[n];
  }
}

__global__ void dequantize_kernel(int scheme, const void* packed, const float* scales, const uint8_t* zeros, float* w,
                                  int64_t N, int64_t K, int64_t group) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * K) return;
  const int64_t n = i / K, k = i % K;
  if (scheme == 0 || scheme == 3) {
    w[i] = float(static_cast<const int8_t*>(packed)[i]) * scales[n];
  } else {
    const uint8_t* row = static_cast<const uint8_t*>(packed) + n * (K / 2);
    w[i] = int4_weight(row, scales, zeros, n, k, K / group, group, scheme == 2);
  }
}

// Calls launch(std::integral_constant<int, R>) with the smallest row bound R in {1, 2, 4, 8, 16} that holds M.
template <typename Launch>
void with_row_bound(int64_t M, Launch launch) {
  if (M <= 1) launch(std::integral_constant<int, 1>{});
  else if (M <= 2) launch(std::integral_constant<int, 2>{});
  else if (M <= 4) launch(std::integral_constant<int, 4>{});
  else if (M <= 8) launch(std::integral_constant<int, 8>{});
  else launch(std::integral_constant<int, 16>{});
}

// y [M, N] fp32 for M <= 16 rows. xq/xs: w8a8's activation codes and scales (else null). int4 needs x and packed
// 16-byte aligned (the host side copies them otherwise). Returns the launch status.
cudaError_t launch_quantized_linear_stream(int scheme, const float* x, const int8_t* xq, const float* xs,
                                           const void* packed, const float* scales, const uint8_t* zeros, float* y,
                                           int64_t M, int64_t N, int64_t K, int64_t group, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (M > kMaxStreamRows) return cudaErrorInvalidValue;
  const void* activations = scheme == 3 ? static_cast<const void*>(xq) : static_cast<const void*>(x);
  const bool vector = K % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(activations) % 16 == 0;
  if ((scheme == 1 || scheme == 2) && !vector) return cudaErrorMisalignedAddress;
  const unsigned threads = 32 * kWarpsPerBlock;
  const auto warp_per_channel = static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const auto warp_per_pair = static_cast<unsigned>((N + kChannelsPerBlock - 1) / kChannelsPerBlock);
  const auto* bytes = static_cast<const uint8_t*>(packed);
  const auto* codes = static_cast<const int8_t*>(packed);
  const int m = static_cast<int>(M);
  with_row_bound(M, [&](auto bound) {
    constexpr int R = decltype(bound)::value;
    if (scheme == 3 && vector)
      w8a8_stream_kernel<R, true><<<warp_per_channel, threads, 0, stream>>>(xq, xs, codes, scales, y, m, N, K);
    else if (scheme == 3)
      w8a8_stream_kernel<R, false><<<warp_per_channel, threads, 0, stream>>>(xq, xs, codes, scales, y, m, N, K);
    else if (scheme == 0 && !vector)
      int8_bytewise_kernel<R><<<warp_per_channel, threads, 0, stream>>>(x, codes, scales, y, m, N, K);
    else if (scheme == 0)
      weight_only_stream_kernel<0, R><<<warp_per_pair, threads, 0, stream>>>(x, bytes, scales, zeros, y, m, N, K, K);
    else if (scheme == 1)
      weight_only_stream_kernel<1, R><<<warp_per_pair, threads, 0, stream>>>(x, bytes, scales, zeros, y, m, N, K, group);
    else
      weight_only_stream_kernel<2, R><<<warp_per_pair, threads, 0, stream>>>(x, bytes, scales, zeros, y, m, N, K, group);
  });
  return cudaGetLastError();
}

cudaError_t launch_dequantize(int scheme, const void* packed, const float* scales, const uint8_t* zeros, float* w,
                              int64_t N, int64_t K, int64_t group, cudaStream_t stream) {
  if (N * K == 0) return cudaSuccess;
  constexpr int threads = 256;
  const auto blocks = static_cast<unsigned>((N * K + threads - 1) / threads);
  dequantize_kernel<<<blocks, threads, 0, stream>>>(scheme, packed, scales, zeros, w, N, K, group);
  return cudaGetLastError();
}

}  // namespace lightning_spec
