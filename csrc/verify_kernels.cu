// CUDA kernel of lightning_spec::verify_tree: one thread per batch row running verify_walk.h, the same code
// as the CPU loop, so the two agree bit for bit (built with --fmad=false). Serial per row on purpose:
// exactness first; a block-parallel row (with the same summation order) is the known next step.
// No torch headers: `nvcc -c -std=c++17 -arch=sm_90a csrc/verify_kernels.cu` compiles it standalone.
#include <cuda_runtime.h>

#include "verify_walk.h"

namespace lightning_spec {

template <typename T>
__global__ void verify_tree_kernel(const int64_t* candidates, const int64_t* parents, const T* target, const T* draft,
                                   int64_t draft_rows, const double* uniforms, int64_t B, int64_t N, int64_t V,
                                   bool greedy, double* scratch, int64_t* accepted, int64_t* num_accepted,
                                   int64_t* next_token) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  verify_tree_row(candidates + b * N, parents + b * N, target + b * N * V, draft ? draft + b * draft_rows * V : draft,
                  uniforms ? uniforms + b * (N + 1) : uniforms, N, V, greedy, scratch ? scratch + b * V : scratch,
                  accepted + b * N, num_accepted + b, next_token + b);
}

// scratch: B * V doubles (null when greedy). Returns the launch status.
template <typename T>
cudaError_t launch_verify_tree(const int64_t* candidates, const int64_t* parents, const T* target, const T* draft,
                               int64_t draft_rows, const double* uniforms, int64_t B, int64_t N, int64_t V,
                               bool greedy, double* scratch, int64_t* accepted, int64_t* num_accepted,
                               int64_t* next_token, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  constexpr int threads = 128;
  const auto blocks = static_cast<unsigned>((B + threads - 1) / threads);
  verify_tree_kernel<T><<<blocks, threads, 0, stream>>>(candidates, parents, target, draft, draft_rows, uniforms, B,
                                                         N, V, greedy, scratch, accepted, num_accepted, next_token);
  return cudaGetLastError();
}

template cudaError_t launch_verify_tree<float>(const int64_t*, const int64_t*, const float*, const float*, int64_t,
                                               const double*, int64_t, int64_t, int64_t, bool, double*, int64_t*,
                                               int64_t*, int64_t*, cudaStream_t);
template cudaError_t launch_verify_tree<double>(const int64_t*, const int64_t*, const double*, const double*, int64_t,
                                                const double*, int64_t, int64_t, int64_t, bool, double*, int64_t*,
                                                int64_t*, int64_t*, cudaStream_t);

}  // namespace lightning_spec
