// CUDA greedy selection kernels: k-center, max-sum (one launch per greedy step, batched over images, no host
// synchronisation) and DART's per-pivot similarity rows. Rows and first picks are prepared with ATen exactly as
// on CPU (csrc/ops.cpp). Every kernel runs on the current stream. The same device code, for NVRTC (no nvcc),
// is vtprune/kernels/src/select.cu: keep the two in step (tests/test_nvrtc.py checks the launch constants).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../vtprune.h"

namespace vtprune {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;

enum Mode { kCosine = 0, kL2 = 1, kMaxSum = 2 };

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Is (v1, i1) a better candidate than (v2, i2)? Index -1 means "none"; ties go to the lower index.
template <typename T>
__device__ __forceinline__ bool better(T v1, int64_t i1, T v2, int64_t i2, bool maximize) {
  if (i1 < 0) return false;
  if (i2 < 0) return true;
  if (v1 == v2) return i1 < i2;
  return maximize ? v1 > v2 : v1 < v2;
}

template <typename T>
__device__ void warp_best(T& v, int64_t& i, bool maximize) {
  for (int o = 16; o > 0; o >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i, maximize)) {
      v = ov;
      i = oi;
    }
  }
}

// Winner of the previous step for image b, from that step's per-block partial results (warp 0 of each block).
template <typename T>
__device__ int64_t reduce_partials(const T* val, const int64_t* idx, int nblocks, bool maximize) {
  T v = 0;
  int64_t i = -1;
  for (int p = threadIdx.x; p < nblocks; p += 32)
    if (better(val[p], idx[p], v, i, maximize)) {
      v = val[p];
      i = idx[p];
    }
  warp_best(v, i, maximize);
  return i;
}

// Greedy step t >= 1 for every image (grid.y): find the pick of step t-1, then update each row's state against it
// (k-center: running min distance; max-sum: running cosine sum), mark the pick taken, and leave this block's best
// candidate in the partials of buffer t % 2.
template <typename T, int MODE>
__global__ void greedy_step_kernel(const T* __restrict__ x, const int64_t* __restrict__ offsets, int64_t d,
                                   T* __restrict__ state, const int64_t* __restrict__ firsts,
                                   const T* __restrict__ prev_val, const int64_t* __restrict__ prev_idx,
                                   T* __restrict__ part_val, int64_t* __restrict__ part_idx, int nblocks,
                                   int64_t* __restrict__ out, int64_t k, int64_t t) {
  constexpr bool maximize = MODE != kMaxSum;
  const int b = blockIdx.y;
  const int64_t base = offsets[b], n = offsets[b + 1] - base;
  __shared__ int64_t cur_s;
  __shared__ T wv[kWarps];
  __shared__ int64_t wi[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    const int64_t cur = t == 1 ? firsts[b] : reduce_partials(prev_val + b * nblocks, prev_idx + b * nblocks,
                                                            nblocks, maximize);
    if (lane == 0) {
      cur_s = cur;
      if (blockIdx.x == 0 && t >= 2) out[b * k + t - 1] = cur;
    }
  }
  __syncthreads();
  const int64_t cur = cur_s;
  const T* c = x + (base + cur) * d;
  const T taken = maximize ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::infinity();
  // duplicates of a pick: distance exactly 0 / cosine exactly 1 (same tolerance as the CPU and torch code)
  const T tol = T(4) * sqrt(static_cast<T>(d < 1 ? 1 : d)) * std::numeric_limits<T>::epsilon();
  T bv = 0;
  int64_t bi = -1;
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp + r;
    if (i >= n) break;
    const T* row = x + (base + i) * d;
    T acc = 0;
    for (int64_t j = lane; j < d; j += 32) {
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
      const T dist = T(1) - min(max(acc, T(-1)), T(1));
      s = min(s, dist <= tol ? T(0) : dist);
    } else if (MODE == kL2) {
      s = min(s, acc);
    } else {
      const T cos = min(max(acc, T(-1)), T(1));
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
    for (int w = 1; w < kWarps; ++w)
      if (better(wv[w], wi[w], bv, bi, maximize)) {
        bv = wv[w];
        bi = wi[w];
      }
    part_val[b * nblocks + blockIdx.x] = bv;
    part_idx[b * nblocks + blockIdx.x] = bi;
  }
}

template <typename T>
__global__ void finish_kernel(const T* val, const int64_t* idx, int nblocks, bool maximize, int64_t* out,
                              int64_t k) {
  const int b = blockIdx.x;
  const int64_t i = reduce_partials(val + b * nblocks, idx + b * nblocks, nblocks, maximize);
  if (threadIdx.x == 0) out[b * k + k - 1] = i;
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

// Cosine of every row of `units` to `pivot`, clamped to [-1, 1]; +inf where the token is not available.
template <typename T>
__global__ void dart_sims_kernel(const T* __restrict__ units, const T* __restrict__ pivot, const bool* available,
                                 int64_t n, int64_t d, T* __restrict__ sims) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (i >= n) return;
  const T* row = units + i * d;
  T acc = 0;
  for (int64_t j = lane; j < d; j += 32) acc += row[j] * pivot[j];
  acc = warp_sum(acc);
  if (lane == 0) sims[i] = available[i] ? min(max(acc, T(-1)), T(1)) : std::numeric_limits<T>::infinity();
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
      dart_sims_kernel<scalar_t><<<(n + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
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
