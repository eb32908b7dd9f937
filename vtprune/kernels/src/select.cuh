// Device code of the greedy selection ops (k-center cosine / l2 and max-sum steps, one launch per greedy step,
// batched over images (grid.y), no host synchronisation; DART's per-pivot cosine rows), as __device__ templates.
// The ONE copy of this device code: the NVRTC entry points (select.cu, launched by vtprune/kernels/nvrtc.py) and the
// nvcc extension (csrc/cuda/select.cu, launched from ATen host code) both include this file and wrap these functions
// in kernels. Rows, first picks and sorts are prepared on the host (csrc/ops.cpp in ATen, nvrtc.py in torch).
// Launch: block = VT_THREADS threads, grid = (ceil(max_n / VT_ROWS_PER_BLOCK), images), static shared memory.
#ifndef VTPRUNE_SELECT_CUH
#define VTPRUNE_SELECT_CUH
#include "common.cuh"

#define VT_WARPS 8
#define VT_THREADS (VT_WARPS * 32)
#define VT_ROWS_PER_WARP 4
#define VT_ROWS_PER_BLOCK (VT_WARPS * VT_ROWS_PER_WARP)

enum Mode { kCosine = 0, kL2 = 1, kMaxSum = 2 };

template <typename T>
__device__ void warp_best(T& v, i64& i, bool maximize) {
  for (int o = 16; o > 0; o >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, v, o);
    const i64 oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i, maximize)) {
      v = ov;
      i = oi;
    }
  }
}

// Winner of the previous step for one image, from that step's per-block partial results (one warp).
template <typename T>
__device__ i64 reduce_partials(const T* val, const i64* idx, int nblocks, bool maximize) {
  T v = 0;
  i64 i = -1;
  for (int p = threadIdx.x % 32; p < nblocks; p += 32)
    if (better(val[p], idx[p], v, i, maximize)) {
      v = val[p];
      i = idx[p];
    }
  warp_best(v, i, maximize);
  return i;
}

// Greedy step t >= 1 for every image (grid.y): find the pick of step t-1, update each row's state against it
// (k-center: running min distance; max-sum: running cosine sum), mark the pick taken, and leave this block's best
// candidate in the partials of this step's buffer.
template <typename T, int MODE>
__device__ void greedy_step(const T* __restrict__ x, const i64* __restrict__ offsets, i64 d, T* __restrict__ state,
                            const i64* __restrict__ firsts, const T* __restrict__ prev_val,
                            const i64* __restrict__ prev_idx, T* __restrict__ part_val, i64* __restrict__ part_idx,
                            int nblocks, i64* __restrict__ out, i64 k, i64 t) {
  const bool maximize = MODE != kMaxSum;
  const int b = blockIdx.y;
  const i64 base = offsets[b], n = offsets[b + 1] - base;
  __shared__ i64 cur_s;
  __shared__ T wv[VT_WARPS];
  __shared__ i64 wi[VT_WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    const i64 cur = t == 1 ? firsts[b]
                           : reduce_partials(prev_val + (i64)b * nblocks, prev_idx + (i64)b * nblocks, nblocks,
                                             maximize);
    if (lane == 0) {
      cur_s = cur;
      if (blockIdx.x == 0 && t >= 2) out[b * k + t - 1] = cur;
    }
  }
  __syncthreads();
  const i64 cur = cur_s;
  const T* c = x + (base + cur) * d;
  const T taken = maximize ? -Lim<T>::inf() : Lim<T>::inf();
  // duplicates of a pick: distance exactly 0 / cosine exactly 1 (same tolerance as the CPU and torch code)
  const T tol = T(4) * sqrt(static_cast<T>(d < 1 ? 1 : d)) * Lim<T>::eps();
  T bv = 0;
  i64 bi = -1;
  for (int r = 0; r < VT_ROWS_PER_WARP; ++r) {
    const i64 i = (i64)blockIdx.x * VT_ROWS_PER_BLOCK + warp * VT_ROWS_PER_WARP + r;
    if (i >= n) break;
    const T* row = x + (base + i) * d;
    T acc = 0;
    for (i64 j = lane; j < d; j += 32) {
      if (MODE == kL2) {
        const T diff = row[j] - c[j];
        acc += diff * diff;
      } else {
        acc += row[j] * c[j];
      }
    }
    acc = warp_sum(acc);
    T s = state[base + i];
    if (MODE == kCosine) {
      const T dist = T(1) - vt_min(vt_max(acc, T(-1)), T(1));
      s = vt_min(s, dist <= tol ? T(0) : dist);
    } else if (MODE == kL2) {
      s = vt_min(s, acc);
    } else {
      const T cos = vt_min(vt_max(acc, T(-1)), T(1));
      s = s + (cos >= T(1) - tol ? T(1) : cos);
    }
    if (i == cur) s = taken;
    if (lane == 0) state[base + i] = s;
    if (better(s, i, bv, bi, maximize)) {
      bv = s;
      bi = i;
    }
  }
  if (lane == 0) {
    wv[warp] = bv;
    wi[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < VT_WARPS; ++w)
      if (better(wv[w], wi[w], bv, bi, maximize)) {
        bv = wv[w];
        bi = wi[w];
      }
    part_val[(i64)b * nblocks + blockIdx.x] = bv;
    part_idx[(i64)b * nblocks + blockIdx.x] = bi;
  }
}

// The last pick of every image (grid = images, one warp each).
template <typename T>
__device__ void greedy_finish(const T* val, const i64* idx, int nblocks, int maximize, i64* out, i64 k) {
  const int b = blockIdx.x;
  const i64 i = reduce_partials(val + (i64)b * nblocks, idx + (i64)b * nblocks, nblocks, maximize != 0);
  if (threadIdx.x == 0) out[b * k + k - 1] = i;
}

// Cosine of every row of `units` to `pivot`, clamped to [-1, 1]; +inf where the token is not available.
// One warp per row: grid = ceil(n / VT_WARPS).
template <typename T>
__device__ void dart_sims(const T* __restrict__ units, const T* __restrict__ pivot, const u8* available, i64 n,
                          i64 d, T* __restrict__ sims) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const i64 i = (i64)blockIdx.x * VT_WARPS + warp;
  if (i >= n) return;
  const T* row = units + i * d;
  T acc = 0;
  for (i64 j = lane; j < d; j += 32) acc += row[j] * pivot[j];
  acc = warp_sum(acc);
  if (lane == 0) sims[i] = available[i] ? vt_min(vt_max(acc, T(-1)), T(1)) : Lim<T>::inf();
}

#endif  // VTPRUNE_SELECT_CUH
