// CUDA kernel of lightning_spec::fake_quantize: one warp per group (a group of 32-128 inputs, or a whole row for the
// per-row schemes), lanes striding over it; observing reduces max / min over the warp (order-free, so exact).
// Same float32 expressions as the CPU loop (built with --fmad=false, IEEE division, rint = round half to even).
// No torch headers: `nvcc -c -std=c++17 -arch=sm_90a csrc/fake_quant_kernels.cu` compiles it standalone.
#include <cuda_runtime.h>

#include <cstdint>

namespace lightning_spec {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr float kTiny = 1e-12f;  // numerics._TINY

// numerics.exact_scale: the low significand bits cleared, so that any code times the scale is exact.
__device__ float exact_scale(float s, int spare_bits) {
  if (!isfinite(s)) return s;
  return __uint_as_float(__float_as_uint(s) & ~((1u << spare_bits) - 1u));
}

__device__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ float warp_min(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <bool kAsym>
__global__ void fake_quantize_kernel(const float* x, float* out, bool* inside, float* scale, float* zero,
                                     int64_t num_groups, int64_t group, float qmin, float qmax, int spare_bits,
                                     bool observe) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (g >= num_groups) return;  // whole warps leave together: the shuffles below see all 32 lanes
  const int lane = threadIdx.x % 32;
  const float* xg = x + g * group;
  if (observe) {
    float lo = 0.f, hi = 0.f;  // min clamped to <= 0, max clamped to >= 0
    bool nan = false;  // fminf/fmaxf skip a NaN, torch's amin/amax return it
    for (int64_t j = lane; j < group; j += 32) {
      lo = fminf(lo, xg[j]);
      hi = fmaxf(hi, xg[j]);
      nan |= isnan(xg[j]);
    }
    lo = warp_min(lo);
    hi = warp_max(hi);
    nan = __any_sync(0xffffffffu, nan);
    if (lane == 0) {
      if (nan) {
        scale[g] = NAN;
        if (kAsym) zero[g] = NAN;
      } else if (kAsym) {
        const float s = exact_scale(fmaxf(__fdiv_rn(hi - lo, 15.f), kTiny), spare_bits);
        scale[g] = s;
        zero[g] = fminf(fmaxf(rintf(__fdiv_rn(-lo, s)), 0.f), 15.f);
      } else {
        scale[g] = exact_scale(fmaxf(fmaxf(__fdiv_rn(-lo, -qmin), __fdiv_rn(hi, qmax)), kTiny), spare_bits);
      }
    }
    __syncwarp();
  }
  const float s = scale[g], z = kAsym ? zero[g] : 0.f;
  for (int64_t j = lane; j < group; j += 32) {
    float c = rintf(__fdiv_rn(xg[j], s));
    if (kAsym) c += z;  // symmetric codes skip it: -0.0 + 0.0 would turn the sign of a zero
    inside[g * group + j] = c >= qmin && c <= qmax;
    c = c < qmin ? qmin : (c > qmax ? qmax : c);
    out[g * group + j] = kAsym ? __fmul_rn(c - z, s) : __fmul_rn(c, s);
  }
}

}  // namespace

// zero: null unless asym. Returns the launch status.
cudaError_t launch_fake_quantize(const float* x, float* out, bool* inside, float* scale, float* zero, int64_t num_groups,
                                 int64_t group, float qmin, float qmax, int spare_bits, bool asym, bool observe,
                                 cudaStream_t stream) {
  if (num_groups == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((num_groups + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (asym) {
    fake_quantize_kernel<true><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(x, out, inside, scale, zero, num_groups,
                                                                          group, qmin, qmax, spare_bits, observe);
  } else {
    fake_quantize_kernel<false><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(x, out, inside, scale, zero, num_groups,
                                                                           group, qmin, qmax, spare_bits, observe);
  }
  return cudaGetLastError();
}

}  // namespace lightning_spec
