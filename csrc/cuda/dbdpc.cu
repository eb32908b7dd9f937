// CUDA DBDPC (PACT): centre finding in one thread block (rounds, then the sequential densest-first pass, all on
// the device: no host synchronisation), then nearest-centre labels in a grid. Same rules as csrc/cpu/dbdpc.cpp.
// The same device code, for NVRTC (no nvcc), is vtprune/kernels/src/dbdpc.cu: keep the two in step.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../vtprune.h"

namespace vtprune {
namespace {

constexpr int kBlock = 1024;
enum : int8_t { kFree = 0, kAssigned = 1, kCentre = 2, kFresh = 3 };
constexpr int kSequentialBelow = 10;  // keep in sync with vtprune/functional/pact.py SEQUENTIAL_BELOW

template <typename T>
__global__ void centres_kernel(const T* __restrict__ dist, const int64_t* __restrict__ rank,
                               const int64_t* __restrict__ by_rank, int64_t n, T cutoff, int8_t* state,
                               T* delta) {
  __shared__ int fresh_count;
  __shared__ int free_count;
  for (;;) {
    // delta_i over the free tokens, new centres marked kFresh
    if (threadIdx.x == 0) fresh_count = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (state[i] != kFree) continue;
      const T* row = dist + i * n;
      T best = std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < n; ++j)
        if (state[j] == kFree && rank[j] < rank[i] && row[j] < best) best = row[j];
      delta[i] = best;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFree && delta[i] > cutoff) {
        state[i] = kFresh;
        atomicAdd(&fresh_count, 1);
      }
    __syncthreads();
    // free tokens within cutoff of a new centre are assigned
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (state[i] != kFree) continue;
      const T* row = dist + i * n;
      for (int64_t c = 0; c < n; ++c)
        if (state[c] == kFresh && row[c] <= cutoff) {
          state[i] = kAssigned;
          break;
        }
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFresh) state[i] = kCentre;
    if (threadIdx.x == 0) free_count = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFree) atomicAdd(&free_count, 1);
    __syncthreads();
    if (free_count == 0) return;
    if (fresh_count < kSequentialBelow) break;
  }
  // sequential pass over the free tokens, densest first
  for (int64_t p = 0; p < n; ++p) {
    const int64_t c = by_rank[p];
    if (state[c] != kFree) continue;  // block-uniform: state[c] is only written before the barrier below
    __syncthreads();
    if (threadIdx.x == 0) state[c] = kCentre;
    const T* row = dist + c * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      if (j != c && state[j] == kFree && rank[j] > p && row[j] <= cutoff) state[j] = kAssigned;
    __syncthreads();
  }
}

template <typename T>
__global__ void labels_kernel(const T* __restrict__ dist, const int8_t* __restrict__ state, int64_t n,
                              int64_t* __restrict__ labels) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (state[i] == kCentre) {
    labels[i] = i;
    return;
  }
  const T* row = dist + i * n;
  int64_t best = -1;
  for (int64_t c = 0; c < n; ++c)
    if (state[c] == kCentre && (best < 0 || row[c] < row[best])) best = c;
  labels[i] = best;
}

}  // namespace

at::Tensor dbdpc_cuda(const at::Tensor& dist_in, const at::Tensor& rank_in, double cutoff) {
  check_dbdpc(dist_in, rank_in, cutoff);
  TORCH_CHECK_VALUE(dist_in.is_cuda(), "dist must be a CUDA tensor here, got ", dist_in.device());
  const c10::cuda::CUDAGuard guard(dist_in.device());
  const at::Tensor dist = dist_in.contiguous(), rank = rank_in.contiguous();
  const int64_t n = dist.size(0);
  // a permutation check without a host copy would need a kernel; a sort is cheap next to the N x N work
  const at::Tensor by_rank = at::argsort(rank);
  TORCH_CHECK_VALUE(at::equal(rank.index_select(0, by_rank), at::arange(n, rank.options())),
                    "rank must be a permutation of 0 .. ", n - 1, " (density order, 0 = densest)");
  at::Tensor state = at::zeros({n}, dist.options().dtype(at::kChar));
  at::Tensor delta = at::empty({n}, dist.options());
  at::Tensor labels = at::empty({n}, rank.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "vtprune_dbdpc_cuda", [&] {
    centres_kernel<scalar_t><<<1, kBlock, 0, stream>>>(dist.data_ptr<scalar_t>(), rank.data_ptr<int64_t>(),
                                                        by_rank.data_ptr<int64_t>(), n,
                                                        static_cast<scalar_t>(cutoff), state.data_ptr<int8_t>(),
                                                        delta.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    labels_kernel<scalar_t><<<(n + 255) / 256, 256, 0, stream>>>(dist.data_ptr<scalar_t>(),
                                                                  state.data_ptr<int8_t>(), n,
                                                                  labels.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return labels;
}

}  // namespace vtprune
