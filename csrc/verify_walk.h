// The tree-verification walk for one batch row: the single definition shared by the CPU loop and the CUDA
// kernel, so that both (and lightning_spec/ops/reference.py) make the same decisions bit for bit.
// Exactness rules: all arithmetic in double, sums sequential in index order, no FMA contraction
// (-ffp-contract=off / --fmad=false). No torch headers: verify_kernels.cu compiles it standalone.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LS_HOST_DEVICE __host__ __device__
#else
#define LS_HOST_DEVICE
#endif

namespace lightning_spec {

template <typename T>
LS_HOST_DEVICE inline double sequential_sum(const T* row, int64_t V) {
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) total += static_cast<double>(row[i]);
  return total;
}

template <typename T>
LS_HOST_DEVICE inline int64_t first_argmax(const T* row, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (static_cast<double>(row[i]) > static_cast<double>(row[best])) best = i;
  return best;
}

// The first child of `node` after `after` (children are tried in node-index order), or -1.
LS_HOST_DEVICE inline int64_t next_child(const int64_t* parents, int64_t N, int64_t node, int64_t after) {
  for (int64_t j = after + 1; j < N; ++j)
    if (parents[j] == node) return j;
  return -1;
}

LS_HOST_DEVICE inline double positive_part(double v) { return v > 0.0 ? v : 0.0; }

// Inverse CDF on the unnormalized residual r (mass m): the first token whose running sum exceeds u * m.
// If rounding leaves none (u * m == m), the last token with r > 0.
LS_HOST_DEVICE inline int64_t sample_inverse_cdf(const double* r, double m, int64_t V, double u) {
  const double threshold = u * m;
  double running = 0.0;
  int64_t last = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (r[i] > 0.0) {
      running += r[i];
      last = i;
      if (running > threshold) return i;
    }
  }
  return last;
}

// Greedy: at each depth accept the first child whose token is the target argmax at the last accepted node.
template <typename T>
LS_HOST_DEVICE inline void walk_greedy(const int64_t* candidates, const int64_t* parents, const T* target, int64_t N,
                                       int64_t V, int64_t* accepted, int64_t* num_accepted, int64_t* next_token) {
  int64_t node = 0, depth = 0;
  for (;;) {
    const int64_t best = first_argmax(target + node * V, V);
    int64_t child = next_child(parents, N, node, node);
    while (child >= 0 && candidates[child] != best) child = next_child(parents, N, node, child);
    if (child < 0) {
      *next_token = best;
      break;
    }
    accepted[++depth] = child;
    node = child;
  }
  *num_accepted = depth;
}

// Stochastic, lossless. The current distribution is the unnormalized residual r with mass m (p = r / m).
// With draft (q = draft[node], mass qm) child x is accepted iff u * q(x) * m < r(x) * qm, i.e. u < p(x) / q(x);
// on rejection r <- max(r * qm - q * m, 0), i.e. p <- norm(max(p - q, 0)). Without draft (one-hot drafts),
// x is accepted iff u * m < r(x); on rejection r(x) <- 0. A rejection that would leave an empty residual
// (only through rounding or a draft token outside its own draft's support) leaves r unchanged.
// uniforms[j] decides candidate node j; uniforms[N] samples the next token from the final residual.
template <typename T>
LS_HOST_DEVICE inline void walk_stochastic(const int64_t* candidates, const int64_t* parents, const T* target,
                                           const T* draft, const double* uniforms, int64_t N, int64_t V, double* r,
                                           int64_t* accepted, int64_t* num_accepted, int64_t* next_token) {
  int64_t node = 0, depth = 0;
  for (;;) {
    for (int64_t i = 0; i < V; ++i) r[i] = static_cast<double>(target[node * V + i]);
    double m = sequential_sum(r, V);
    int64_t child = next_child(parents, N, node, node);
    // A leaf's draft row is never read: the last node is always a leaf, so draft may omit its row.
    const T* q = draft && child >= 0 ? draft + node * V : nullptr;
    const double qm = q ? sequential_sum(q, V) : 0.0;
    for (; child >= 0; child = next_child(parents, N, node, child)) {
      const int64_t x = candidates[child];
      const double u = uniforms[child];
      if (q ? (u * static_cast<double>(q[x]) * m < r[x] * qm) : (u * m < r[x])) break;
      double residual_mass = 0.0;
      if (q) {
        for (int64_t i = 0; i < V; ++i) residual_mass += positive_part(r[i] * qm - static_cast<double>(q[i]) * m);
        if (residual_mass > 0.0)
          for (int64_t i = 0; i < V; ++i) r[i] = positive_part(r[i] * qm - static_cast<double>(q[i]) * m);
      } else {
        for (int64_t i = 0; i < V; ++i) residual_mass += i == x ? 0.0 : r[i];
        if (residual_mass > 0.0) r[x] = 0.0;
      }
      if (residual_mass > 0.0) m = residual_mass;
    }
    if (child < 0) {
      *next_token = sample_inverse_cdf(r, m, V, uniforms[N]);
      break;
    }
    accepted[++depth] = child;
    node = child;
  }
  *num_accepted = depth;
}

// One batch row. accepted has N slots; draft may be null (one-hot drafts); uniforms unused when greedy.
template <typename T>
LS_HOST_DEVICE inline void verify_tree_row(const int64_t* candidates, const int64_t* parents, const T* target,
                                           const T* draft, const double* uniforms, int64_t N, int64_t V, bool greedy,
                                           double* scratch, int64_t* accepted, int64_t* num_accepted,
                                           int64_t* next_token) {
  for (int64_t i = 0; i < N; ++i) accepted[i] = -1;
  accepted[0] = 0;
  if (greedy)
    walk_greedy(candidates, parents, target, N, V, accepted, num_accepted, next_token);
  else
    walk_stochastic(candidates, parents, target, draft, uniforms, N, V, scratch, accepted, num_accepted, next_token);
}

}  // namespace lightning_spec
