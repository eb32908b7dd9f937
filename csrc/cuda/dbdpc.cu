// CUDA DBDPC (PACT): centre finding in one thread block (rounds, then the sequential densest-first pass, all on
// the device: no host synchronisation), then nearest-centre labels in a grid. Same rules as csrc/cpu/dbdpc.cpp.
// Host code only: the device code is vtprune/kernels/src/dbdpc.cuh, the one copy NVRTC compiles too
// (vtprune/kernels/src/dbdpc.cu); the kernels below only wrap its functions.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../../vtprune/kernels/src/dbdpc.cuh"
#include "../vtprune.h"

namespace vtprune {
namespace {

constexpr int kBlock = VT_DBDPC_BLOCK;
constexpr int kLabelBlock = VT_LABEL_BLOCK;

template <typename T>
__global__ void __launch_bounds__(VT_DBDPC_BLOCK)
    centres_kernel(const T* dist, const int64_t* rank, const int64_t* by_rank, int64_t n, T cutoff, int8_t* state,
                   T* delta) {
  centres<T>(dist, rank, by_rank, n, cutoff, state, delta);
}

template <typename T>
__global__ void __launch_bounds__(VT_LABEL_BLOCK)
    labels_kernel(const T* dist, const int8_t* state, int64_t n, int64_t* out) {
  labels<T>(dist, state, n, out);
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
    labels_kernel<scalar_t><<<(n + kLabelBlock - 1) / kLabelBlock, kLabelBlock, 0, stream>>>(
        dist.data_ptr<scalar_t>(), state.data_ptr<int8_t>(), n, labels.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return labels;
}

}  // namespace vtprune
