// Row reductions of the CPU kernels, with a fixed summation order: 16 running partial sums over the
// features, combined pairwise, then the tail. The order depends only on D, never on where a row sits in
// memory, so duplicated tokens get bitwise identical values and their ties break towards the lower index.
#pragma once

#include <omp.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace vtprune {
namespace cpu {

constexpr int kLanes = 16;

// Rounding tolerance of a length-d dot product, 4 sqrt(d) eps (vtprune.functional._common.near_zero_tol):
// distances below it are exact duplicates.
template <typename T>
inline T near_zero_tol(int64_t d) {
  return T(4) * std::sqrt(static_cast<T>(d < 1 ? 1 : d)) * std::numeric_limits<T>::epsilon();
}

template <typename T>
inline T combine(const T* acc) {
  T s8[8];
  for (int j = 0; j < 8; ++j) s8[j] = acc[j] + acc[j + 8];
  T s4[4];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  T tail = 0;
  for (; i < d; ++i) tail += a[i] * b[i];
  return combine(acc) + tail;
}

// Cosine of two unit rows, clamped to [-1, 1].
template <typename T>
inline T unit_cosine(const T* a, const T* b, int64_t d) {
  return std::min<T>(std::max<T>(dot(a, b, d), T(-1)), T(1));
}

template <typename T>
inline T sq_dist(const T* a, const T* b, int64_t d) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const T diff = a[i + j] - b[i + j];
      acc[j] += diff * diff;
    }
  T tail = 0;
  for (; i < d; ++i) tail += (a[i] - b[i]) * (a[i] - b[i]);
  return combine(acc) + tail;
}

// OpenMP threads for a loop of `work` multiply-adds: torch's intra-op thread count, 1 for small loops.
inline int threads_for(int64_t work) {
  return work < (int64_t(1) << 15) ? 1 : at::get_num_threads();
}

// Contiguous chunk [lo, hi) of [0, n) for thread `tid` of `nt`: chunks are in index order, so combining
// per-thread winners in thread order keeps "ties go to the lower index".
inline void chunk(int64_t n, int tid, int nt, int64_t& lo, int64_t& hi) {
  const int64_t per = n / nt, extra = n % nt;
  lo = tid * per + (tid < extra ? tid : extra);
  hi = lo + per + (tid < extra ? 1 : 0);
}

}  // namespace cpu
}  // namespace vtprune
