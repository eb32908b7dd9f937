// CUDA greedy selection ops: k-center, max-sum (one launch per greedy step, batched over images, no host
// synchronisation) and DART's per-pivot similarity rows. Rows and first picks are prepared with ATen exactly as
// on CPU (csrc/ops.cpp). Every kernel runs on the current stream. Host code only: the device code is
// vtprune/kernels/src/select.cuh, the one copy NVRTC compiles too (vtprune/kernels/src/select.cu); the kernels
// below only wrap its functions (tests/functional/test_nvrtc.py checks both back ends include the same text).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../../vtprune/kernels/src/select.cuh"
#include "../vtprune.h"

namespace vtprune {
namespace {

constexpr int kThreads = VT_THREADS;
constexpr int kRowsPerBlock = VT_ROWS_PER_BLOCK;

template <typename T, int MODE>
__global__ void __launch_bounds__(VT_THREADS)
    greedy_step_kernel(const T* x, const int64_t* offsets, int64_t d, T* state, const int64_t* firsts,
                       const T* prev_val, const int64_t* prev_idx, T* part_val, int64_t* part_idx, int nblocks,
                       int64_t* out, int64_t k, int64_t t) {
  greedy_step<T, MODE>(x, offsets, d, state, firsts, prev_val, prev_idx, part_val, part_idx, nblocks, out, k, t);
}

template <typename T>
__global__ void finish_kernel(const T* val, const int64_t* idx, int nblocks, bool maximize, int64_t* out,
                              int64_t k) {
  greedy_finish<T>(val, idx, nblocks, maximize, out, k);
}

template <typename T>
__global__ void __launch_bounds__(VT_THREADS)
    dart_sims_kernel(const T* units, const T* pivot, const bool* available, int64_t n, int64_t d, T* sims) {
  dart_sims<T>(units, pivot, reinterpret_cast<const u8*>(available), n, d, sims);
}

template <typename T, int MODE>
void run_steps(const at::Tensor& x, const at::Tensor& offsets_dev, const at::Tensor& firsts, int64_t max_n,
               int64_t k, at::Tensor& out) {
  const int64_t images = out.size(0);
  const int nblocks = static_cast<int>((max_n + kRowsPerBlock - 1) / kRowsPerBlock);
  const bool maximize = MODE != kMaxSum;
  at::Tensor state = at::full({x.size(0)}, maximize ? std::numeric_limits<double>::infinity() : 0.0, x.options());
  at::Tensor vals = at::empty({2, images * nblocks}, x.options());
  at::Tensor idxs = at::empty({2, images * nblocks}, x.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t t = 1; t < k; ++t) {
    const int64_t now = t % 2, before = 1 - now;
    greedy_step_kernel<T, MODE><<<dim3(nblocks, images), kThreads, 0, stream>>>(
        x.data_ptr<T>(), offsets_dev.data_ptr<int64_t>(), x.size(1), state.data_ptr<T>(),
        firsts.data_ptr<int64_t>(), vals[before].data_ptr<T>(), idxs[before].data_ptr<int64_t>(),
        vals[now].data_ptr<T>(), idxs[now].data_ptr<int64_t>(), nblocks, out.data_ptr<int64_t>(), k, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (k >= 2) {
    const int64_t last = (k - 1) % 2;
    finish_kernel<T><<<images, 32, 0, stream>>>(vals[last].data_ptr<T>(), idxs[last].data_ptr<int64_t>(), nblocks,
                                                maximize, out.data_ptr<int64_t>(), k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor greedy_cuda(const at::Tensor& x_in, at::IntArrayRef offsets_in, int64_t k, at::IntArrayRef first,
                       int mode) {
  const auto offsets = check_offsets(x_in, offsets_in, k, first);
  TORCH_CHECK_VALUE(x_in.is_cuda(), "x must be a CUDA tensor here, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool l2 = mode == kL2;
  const at::Tensor x = (l2 ? x_in : unit_rows(x_in)).contiguous();
  const at::Tensor firsts = first_picks(x, offsets, first, l2);
  const int64_t images = static_cast<int64_t>(offsets.size()) - 1;
  int64_t max_n = 0;
  for (int64_t b = 0; b < images; ++b) max_n = std::max(max_n, offsets[b + 1] - offsets[b]);
  const at::Tensor offsets_dev = at::tensor(offsets, x.options().dtype(at::kLong));
  at::Tensor out = at::empty({images, k}, x.options().dtype(at::kLong));
  out.select(1, 0).copy_(firsts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vtprune_greedy_cuda", [&] {
    if (mode == kCosine) run_steps<scalar_t, kCosine>(x, offsets_dev, firsts, max_n, k, out);
    else if (mode == kL2) run_steps<scalar_t, kL2>(x, offsets_dev, firsts, max_n, k, out);
    else run_steps<scalar_t, kMaxSum>(x, offsets_dev, firsts, max_n, k, out);
  });
  return out;
}

}  // namespace

at::Tensor kcenter_cuda(const at::Tensor& x, at::IntArrayRef offsets, int64_t k, at::IntArrayRef first,
                        c10::string_view metric) {
  return greedy_cuda(x, offsets, k, first, check_metric(metric) ? kL2 : kCosine);
}

at::Tensor maxsum_cuda(const at::Tensor& x, at::IntArrayRef offsets, int64_t k, at::IntArrayRef first) {
  return greedy_cuda(x, offsets, k, first, kMaxSum);
}

at::Tensor dart_pick_cuda(const at::Tensor& units_in, const at::Tensor& pivots_in, const at::Tensor& excluded,
                          at::IntArrayRef counts) {
  check_dart(units_in, pivots_in, excluded, counts);
  TORCH_CHECK_VALUE(units_in.is_cuda(), "units must be a CUDA tensor here, got ", units_in.device());
  const c10::cuda::CUDAGuard guard(units_in.device());
  const at::Tensor units = units_in.contiguous(), pivots = pivots_in.contiguous();
  const int64_t n = units.size(0), d = units.size(1);
  at::Tensor available = at::ones({n}, units.options().dtype(at::kBool));
  available.index_fill_(0, excluded, false);
  int64_t remaining = n - excluded.size(0);
  at::Tensor sims = at::empty({n}, units.options());
  std::vector<at::Tensor> picks;
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t t = 0; t < counts.size() && remaining > 0; ++t) {
    const int64_t take = std::min<int64_t>(counts[t], remaining);
    if (take == 0) continue;
    AT_DISPATCH_FLOATING_TYPES(units.scalar_type(), "vtprune_dart_cuda", [&] {
      dart_sims_kernel<scalar_t><<<(n + VT_WARPS - 1) / VT_WARPS, kThreads, 0, stream>>>(
          units.data_ptr<scalar_t>(), pivots[t].data_ptr<scalar_t>(), available.data_ptr<bool>(), n, d,
          sims.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    at::Tensor chosen = std::get<1>(sims.sort(/*stable=*/true, 0, /*descending=*/false)).narrow(0, 0, take);
    available.index_fill_(0, chosen, false);
    picks.push_back(chosen);
    remaining -= take;
  }
  if (picks.empty()) return at::empty({0}, units.options().dtype(at::kLong));
  return at::cat(picks);
}

at::Tensor dbdpc_cuda(const at::Tensor& dist, const at::Tensor& rank, double cutoff);

}  // namespace vtprune

TORCH_LIBRARY_IMPL(vtprune, CUDA, m) {
  m.impl("kcenter", &vtprune::kcenter_cuda);
  m.impl("maxsum", &vtprune::maxsum_cuda);
  m.impl("dart_pick", &vtprune::dart_pick_cuda);
  m.impl("dbdpc", &vtprune::dbdpc_cuda);
}
