// Device code of DBDPC (PACT): centre finding in one thread block (rounds, then the sequential densest-first pass,
// all on the device), then nearest-centre labels in a grid; the rules of csrc/cpu/dbdpc.cpp. The ONE copy of this
// device code: the NVRTC entry points (dbdpc.cu) and the nvcc extension (csrc/cuda/dbdpc.cu) both wrap it.
// Launch: centres grid = 1, block = VT_DBDPC_BLOCK; labels grid = ceil(n / VT_LABEL_BLOCK), block = VT_LABEL_BLOCK.
#ifndef VTPRUNE_DBDPC_CUH
#define VTPRUNE_DBDPC_CUH
#include "common.cuh"

#define VT_DBDPC_BLOCK 1024
#define VT_LABEL_BLOCK 256
#define VT_SEQUENTIAL_BELOW 10  // keep in sync with vtprune/functional/pact.py SEQUENTIAL_BELOW

enum : i8 { kFree = 0, kAssigned = 1, kCentre = 2, kFresh = 3 };

template <typename T>
__device__ void centres(const T* __restrict__ dist, const i64* __restrict__ rank, const i64* __restrict__ by_rank,
                        i64 n, T cutoff, i8* state, T* delta) {
  __shared__ int fresh_count;
  __shared__ int free_count;
  for (;;) {
    // delta_i over the free tokens, new centres marked kFresh
    if (threadIdx.x == 0) fresh_count = 0;
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
      if (state[i] != kFree) continue;
      const T* row = dist + i * n;
      T best = Lim<T>::inf();
      for (i64 j = 0; j < n; ++j)
        if (state[j] == kFree && rank[j] < rank[i] && row[j] < best) best = row[j];
      delta[i] = best;
    }
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFree && delta[i] > cutoff) {
        state[i] = kFresh;
        atomicAdd(&fresh_count, 1);
      }
    __syncthreads();
    // free tokens within cutoff of a new centre are assigned
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
      if (state[i] != kFree) continue;
      const T* row = dist + i * n;
      for (i64 c = 0; c < n; ++c)
        if (state[c] == kFresh && row[c] <= cutoff) {
          state[i] = kAssigned;
          break;
        }
    }
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFresh) state[i] = kCentre;
    if (threadIdx.x == 0) free_count = 0;
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFree) atomicAdd(&free_count, 1);
    __syncthreads();
    if (free_count == 0) return;
    if (fresh_count < VT_SEQUENTIAL_BELOW) break;
  }
  // sequential pass over the free tokens, densest first
  for (i64 p = 0; p < n; ++p) {
    const i64 c = by_rank[p];
    if (state[c] != kFree) continue;  // block-uniform: state[c] is only written before the barrier below
    __syncthreads();
    if (threadIdx.x == 0) state[c] = kCentre;
    const T* row = dist + c * n;
    for (i64 j = threadIdx.x; j < n; j += blockDim.x)
      if (j != c && state[j] == kFree && rank[j] > p && row[j] <= cutoff) state[j] = kAssigned;
    __syncthreads();
  }
}

template <typename T>
__device__ void labels(const T* __restrict__ dist, const i8* __restrict__ state, i64 n, i64* __restrict__ out) {
  const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (state[i] == kCentre) {
    out[i] = i;
    return;
  }
  const T* row = dist + i * n;
  i64 best = -1;
  for (i64 c = 0; c < n; ++c)
    if (state[c] == kCentre && (best < 0 || row[c] < row[best])) best = c;
  out[i] = best;
}

#endif  // VTPRUNE_DBDPC_CUH
