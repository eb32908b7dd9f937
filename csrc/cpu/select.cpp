// CPU (OpenMP) greedy selection kernels: k-center, max-sum and DART's per-pivot picks.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../vtprune.h"
#include "rows.h"

namespace vtprune {
namespace {

// One greedy step over the rows of one image: state[i] <- update(state[i], row value of i against the pivot
// `cur`), then the best state (max for k-center, min for max-sum; lower index on ties). The pivot's own state
// is set to `taken` so that it is never picked again.
template <typename T, typename Value, typename Update>
int64_t greedy_step(T* state, int64_t n, int64_t d, int64_t cur, T taken, bool maximize, Value value,
                    Update update) {
  const int nt = cpu::threads_for(n * d);
  std::vector<T> best_val(nt);
  std::vector<int64_t> best_idx(nt, -1);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    int64_t lo, hi;
    cpu::chunk(n, tid, omp_get_num_threads(), lo, hi);
    T bv = 0;
    int64_t bi = -1;
    for (int64_t i = lo; i < hi; ++i) {
      T s = update(state[i], value(i));
      if (i == cur) s = taken;
      state[i] = s;
      if (bi < 0 || (maximize ? s > bv : s < bv)) {
        bv = s;
        bi = i;
      }
    }
    best_val[tid] = bv;
    best_idx[tid] = bi;
  }
  int64_t winner = -1;
  T wv = 0;
  for (int t = 0; t < nt; ++t) {
    if (best_idx[t] < 0) continue;
    if (winner < 0 || (maximize ? best_val[t] > wv : best_val[t] < wv)) {
      wv = best_val[t];
      winner = best_idx[t];
    }
  }
  return winner;
}

template <typename T>
void kcenter_image(const T* x, int64_t n, int64_t d, int64_t k, int64_t first, bool l2, int64_t* out) {
  std::vector<T> min_dist(n, std::numeric_limits<T>::infinity());
  const T tol = cpu::near_zero_tol<T>(d);
  int64_t cur = first;
  for (int64_t t = 0; t < k; ++t) {
    out[t] = cur;
    if (t == k - 1) break;
    const T* c = x + cur * d;
    auto value = [&](int64_t i) -> T {
      if (l2) return cpu::sq_dist(x + i * d, c, d);
      const T dist = T(1) - cpu::unit_cosine(x + i * d, c, d);
      return dist <= tol ? T(0) : dist;  // a duplicate of a pick is at distance exactly 0 (exact ties)
    };
    auto update = [](T old, T v) { return std::min(old, v); };
    cur = greedy_step(min_dist.data(), n, d, cur, -std::numeric_limits<T>::infinity(), true, value, update);
  }
}

template <typename T>
void maxsum_image(const T* x, int64_t n, int64_t d, int64_t k, int64_t first, int64_t* out) {
  std::vector<T> sim_sum(n, T(0));
  const T tol = cpu::near_zero_tol<T>(d);
  int64_t cur = first;
  for (int64_t t = 0; t < k; ++t) {
    out[t] = cur;
    if (t == k - 1) break;
    const T* c = x + cur * d;
    auto value = [&](int64_t i) -> T {
      const T cos = cpu::unit_cosine(x + i * d, c, d);
      return cos >= T(1) - tol ? T(1) : cos;  // a duplicate of a pick has cosine exactly 1
    };
    auto update = [](T old, T v) { return old + v; };
    cur = greedy_step(sim_sum.data(), n, d, cur, std::numeric_limits<T>::infinity(), false, value, update);
  }
}

// Shared driver: one image at a time (bounded memory: a batch of large images is never normalised at once),
// rows and first pick prepared with the same ATen calls as the pure-torch code, then `image` runs the greedy loop.
template <typename Image>
at::Tensor run_greedy(const at::Tensor& x_in, at::IntArrayRef offsets_in, int64_t k, at::IntArrayRef first,
                      bool l2, Image image) {
  const auto offsets = check_offsets(x_in, offsets_in, k, first);
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "x must be a CPU tensor here, got ", x_in.device());
  const int64_t images = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor out = at::empty({images, k}, x_in.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < images; ++b) {
    const int64_t n = offsets[b + 1] - offsets[b];
    const at::Tensor rows = x_in.narrow(0, offsets[b], n);
    const at::Tensor x = (l2 ? rows : unit_rows(rows)).contiguous();
    const int64_t f = first[b] >= 0 ? first[b] : farthest_nearest_neighbour(x, l2).item<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vtprune_greedy", [&] {
      image(x.data_ptr<scalar_t>(), n, x.size(1), f, o + b * k);
    });
  }
  return out;
}

}  // namespace

at::Tensor kcenter_cpu(const at::Tensor& x, at::IntArrayRef offsets, int64_t k, at::IntArrayRef first,
                       c10::string_view metric) {
  const bool l2 = check_metric(metric);
  return run_greedy(x, offsets, k, first, l2, [&](const auto* rows, int64_t n, int64_t d, int64_t f, int64_t* out) {
    kcenter_image(rows, n, d, k, f, l2, out);
  });
}

at::Tensor maxsum_cpu(const at::Tensor& x, at::IntArrayRef offsets, int64_t k, at::IntArrayRef first) {
  return run_greedy(x, offsets, k, first, false, [&](const auto* rows, int64_t n, int64_t d, int64_t f,
                                                     int64_t* out) { maxsum_image(rows, n, d, k, f, out); });
}

namespace {

template <typename T>
void dart_impl(const T* u, const T* p, int64_t n, int64_t d, at::IntArrayRef counts, std::vector<char>& available,
               int64_t remaining, std::vector<int64_t>& picks) {
  std::vector<T> sims(n);
  std::vector<int64_t> pool;
  for (size_t t = 0; t < counts.size() && remaining > 0; ++t) {
    const int64_t take = std::min<int64_t>(counts[t], remaining);
    if (take == 0) continue;
    const T* piv = p + static_cast<int64_t>(t) * d;
#pragma omp parallel for num_threads(cpu::threads_for(n * d)) schedule(static)
    for (int64_t i = 0; i < n; ++i)
      if (available[i]) sims[i] = cpu::unit_cosine(u + i * d, piv, d);
    pool.clear();
    for (int64_t i = 0; i < n; ++i)
      if (available[i]) pool.push_back(i);
    auto lower = [&](int64_t a, int64_t b) { return sims[a] < sims[b] || (sims[a] == sims[b] && a < b); };
    std::partial_sort(pool.begin(), pool.begin() + take, pool.end(), lower);
    for (int64_t j = 0; j < take; ++j) {
      available[pool[j]] = 0;
      picks.push_back(pool[j]);
    }
    remaining -= take;
  }
}

}  // namespace

at::Tensor dart_pick_cpu(const at::Tensor& units_in, const at::Tensor& pivots_in, const at::Tensor& excluded_in,
                         at::IntArrayRef counts) {
  check_dart(units_in, pivots_in, excluded_in, counts);
  TORCH_CHECK_VALUE(units_in.device().is_cpu(), "units must be a CPU tensor here, got ", units_in.device());
  const at::Tensor units = units_in.contiguous(), pivots = pivots_in.contiguous();
  const at::Tensor excluded = excluded_in.contiguous();
  const int64_t n = units.size(0), d = units.size(1);
  std::vector<char> available(n, 1);
  const int64_t* ex = excluded.data_ptr<int64_t>();
  for (int64_t e = 0; e < excluded.size(0); ++e) {
    TORCH_CHECK_VALUE(ex[e] >= 0 && ex[e] < n, "excluded must hold indices in [0, ", n - 1, "], got ", ex[e]);
    TORCH_CHECK_VALUE(available[ex[e]], "excluded must not repeat an index, got ", ex[e], " twice");
    available[ex[e]] = 0;
  }
  std::vector<int64_t> picks;
  AT_DISPATCH_FLOATING_TYPES(units.scalar_type(), "vtprune_dart_pick", [&] {
    dart_impl(units.data_ptr<scalar_t>(), pivots.data_ptr<scalar_t>(), n, d, counts, available,
              n - excluded.size(0), picks);
  });
  return at::tensor(picks, units.options().dtype(at::kLong));
}

}  // namespace vtprune

TORCH_LIBRARY_IMPL(vtprune, CPU, m) {
  m.impl("kcenter", &vtprune::kcenter_cpu);
  m.impl("maxsum", &vtprune::maxsum_cpu);
  m.impl("dart_pick", &vtprune::dart_pick_cpu);
  m.impl("dbdpc", &vtprune::dbdpc_cpu);
}
