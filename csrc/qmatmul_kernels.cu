// CUDA kernels of lightning_spec::quantized_linear (numerics: lightning_spec/quant/numerics.py).
// Small M (decode / verification, M <= 16): one warp per output channel streams its packed row once, each lane
// accumulating all M rows, then a warp-shuffle reduction. Large M: dequantize to fp32 and let cuBLAS multiply
// (the host side, qmatmul_cuda.cpp). w8a8 takes per-token int8 activation codes made on the host side and
// accumulates in int32 with dp4a.
// No torch headers: `nvcc -c -std=c++17 -arch=sm_90a csrc/qmatmul_kernels.cu` compiles it standalone.
#include <cuda_runtime.h>

#include <cstdint>

namespace lightning_spec {

constexpr int kMaxStreamRows = 16;
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The weight code of input k in channel n's packed row, minus its zero point (int4 layouts: 32-input chunks of
// 16 bytes, byte j = input j (low nibble) and input j + 16 (high nibble)).
__device__ __forceinline__ float int4_weight(const uint8_t* row, const float* scales, const uint8_t* zeros, int64_t n,
                                             int64_t k, int64_t groups, int64_t group, bool asym) {
  const uint8_t byte = row[(k / 32) * 16 + (k % 16)];
  const int q = (k % 32) < 16 ? (byte & 0x0F) : (byte >> 4);
  const int64_t g = k / group;
  const int z = asym ? zeros[n * groups + g] : 8;
  return float(q - z) * scales[n * groups + g];
}

// scheme: 0 int8, 1 int4, 2 int4_asym (3, w8a8, is w8a8_stream_kernel).
__global__ void weight_only_stream_kernel(int scheme, const float* x, const void* packed, const float* scales,
                                          const uint8_t* zeros, float* y, int64_t M, int64_t N, int64_t K,
                                          int64_t group) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  float acc[kMaxStreamRows];
  for (int r = 0; r < kMaxStreamRows; ++r) acc[r] = 0.f;
  if (scheme == 0) {
    const int8_t* row = static_cast<const int8_t*>(packed) + n * K;
    for (int64_t k = lane; k < K; k += 32) {
      const float w = float(row[k]);
      for (int r = 0; r < M; ++r) acc[r] += x[r * K + k] * w;
    }
    for (int r = 0; r < M; ++r) acc[r] *= scales[n];
  } else {
    const uint8_t* row = static_cast<const uint8_t*>(packed) + n * (K / 2);
    const int64_t groups = K / group;
    for (int64_t k = lane; k < K; k += 32) {
      const float w = int4_weight(row, scales, zeros, n, k, groups, group, scheme == 2);
      for (int r = 0; r < M; ++r) acc[r] += x[r * K + k] * w;
    }
  }
  for (int r = 0; r < M; ++r) {
    const float total = warp_sum(acc[r]);
    if (lane == 0) y[r * N + n] = total;
  }
}

__global__ void w8a8_stream_kernel(const int8_t* xq, const float* xs, const int8_t* packed, const float* scales,
                                   float* y, int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  int acc[kMaxStreamRows];
  for (int r = 0; r < kMaxStreamRows; ++r) acc[r] = 0;
  const int8_t* row = packed + n * K;
  const bool vec = K % 4 == 0;  // four codes per 32-bit word: dp4a
  if (vec) {
    for (int64_t k = 4 * lane; k < K; k += 128) {
      const int w = *reinterpret_cast<const int*>(row + k);
      for (int r = 0; r < M; ++r) acc[r] = __dp4a(*reinterpret_cast<const int*>(xq + r * K + k), w, acc[r]);
    }
  } else {
    for (int64_t k = lane; k < K; k += 32)
      for (int r = 0; r < M; ++r) acc[r] += int(xq[r * K + k]) * int(row[k]);
  }
  for (int r = 0; r < M; ++r) {
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

// y [M, N] fp32 for M <= 16 rows. xq/xs: w8a8's activation codes and scales (else null). Returns the launch status.
cudaError_t launch_quantized_linear_stream(int scheme, const float* x, const int8_t* xq, const float* xs,
                                           const void* packed, const float* scales, const uint8_t* zeros, float* y,
                                           int64_t M, int64_t N, int64_t K, int64_t group, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (M > kMaxStreamRows) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (scheme == 3)
    w8a8_stream_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(xq, xs, static_cast<const int8_t*>(packed), scales, y, M,
                                                                    N, K);
  else
    weight_only_stream_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(scheme, x, packed, scales, zeros, y, M, N, K,
                                                                           group);
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
