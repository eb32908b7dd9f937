// CPU (OpenMP) DBDPC centre finding and nearest-centre assignment (PACT, orailix/PACT).
//
// Input: the cosine-distance matrix dist [N, N] and each token's density rank (0 = densest), both computed by
// vtprune.functional.pact with ATen, so this kernel and the pure-torch reference compare the same numbers.
//
// Rounds: among the unassigned tokens U, delta_i = min dist[i][j] over the denser j in U (inf for the densest);
// tokens with delta_i > cutoff become centres, and every token of U within cutoff of a new centre is assigned.
// When a round finds fewer than 10 centres, the remaining tokens are taken densest first: a token not yet
// within cutoff of an earlier one of them becomes a centre and covers the later ones within cutoff. Finally
// every token gets the nearest centre (lower centre index on ties); centres label themselves.
#include <limits>
#include <numeric>
#include <vector>

#include "../vtprune.h"
#include "rows.h"

namespace vtprune {
namespace {

template <typename T>
void dbdpc_impl(const T* dist, const int64_t* rank, int64_t n, T cutoff, int64_t* labels) {
  std::vector<int64_t> unassigned(n);
  std::iota(unassigned.begin(), unassigned.end(), 0);
  std::vector<char> is_centre(n, 0);
  std::vector<T> delta;
  const T inf = std::numeric_limits<T>::infinity();
  while (!unassigned.empty()) {
    const int64_t u = static_cast<int64_t>(unassigned.size());
    delta.assign(u, inf);
#pragma omp parallel for num_threads(cpu::threads_for(u * u)) schedule(static)
    for (int64_t a = 0; a < u; ++a) {
      const int64_t i = unassigned[a];
      const T* row = dist + i * n;
      T best = inf;
      for (int64_t b = 0; b < u; ++b) {
        const int64_t j = unassigned[b];
        if (rank[j] < rank[i] && row[j] < best) best = row[j];
      }
      delta[a] = best;
    }
    std::vector<int64_t> fresh;
    for (int64_t a = 0; a < u; ++a)
      if (delta[a] > cutoff) fresh.push_back(unassigned[a]);
    for (int64_t c : fresh) is_centre[c] = 1;
    std::vector<char> keep(u, 0);
#pragma omp parallel for num_threads(cpu::threads_for(u * static_cast<int64_t>(fresh.size()))) schedule(static)
    for (int64_t a = 0; a < u; ++a) {
      const int64_t i = unassigned[a];
      if (is_centre[i]) continue;
      bool covered = false;
      for (int64_t c : fresh)
        if (dist[i * n + c] <= cutoff) {
          covered = true;
          break;
        }
      keep[a] = !covered;
    }
    std::vector<int64_t> rest;
    for (int64_t a = 0; a < u; ++a)
      if (keep[a]) rest.push_back(unassigned[a]);
    if (fresh.size() < 10) {
      std::sort(rest.begin(), rest.end(), [&](int64_t a, int64_t b) { return rank[a] < rank[b]; });
      const int64_t r = static_cast<int64_t>(rest.size());
      std::vector<char> covered(r, 0);
      for (int64_t a = 0; a < r; ++a) {
        if (covered[a]) continue;
        const int64_t c = rest[a];
        is_centre[c] = 1;
        const T* row = dist + c * n;
        for (int64_t b = a + 1; b < r; ++b)
          if (row[rest[b]] <= cutoff) covered[b] = 1;
      }
      break;
    }
    unassigned.swap(rest);
  }
  std::vector<int64_t> centres;
  for (int64_t i = 0; i < n; ++i)
    if (is_centre[i]) centres.push_back(i);
#pragma omp parallel for num_threads(cpu::threads_for(n * static_cast<int64_t>(centres.size()))) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (is_centre[i]) {
      labels[i] = i;
      continue;
    }
    const T* row = dist + i * n;
    int64_t best = centres[0];
    for (int64_t c : centres)
      if (row[c] < row[best]) best = c;
    labels[i] = best;
  }
}

}  // namespace

at::Tensor dbdpc_cpu(const at::Tensor& dist_in, const at::Tensor& rank_in, double cutoff) {
  check_dbdpc(dist_in, rank_in, cutoff);
  TORCH_CHECK_VALUE(dist_in.device().is_cpu(), "dist must be a CPU tensor here, got ", dist_in.device());
  const at::Tensor dist = dist_in.contiguous(), rank = rank_in.contiguous();
  const int64_t n = dist.size(0);
  const int64_t* r = rank.data_ptr<int64_t>();
  std::vector<char> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(r[i] >= 0 && r[i] < n && !seen[r[i]], "rank must be a permutation of 0 .. ", n - 1,
                      " (density order, 0 = densest)");
    seen[r[i]] = 1;
  }
  at::Tensor labels = at::empty({n}, rank.options());
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "vtprune_dbdpc", [&] {
    dbdpc_impl(dist.data_ptr<scalar_t>(), r, n, static_cast<scalar_t>(cutoff), labels.data_ptr<int64_t>());
  });
  return labels;
}

}  // namespace vtprune
