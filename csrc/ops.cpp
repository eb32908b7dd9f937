// Schemas of vtprune's native ops (declared once, here) and the device-agnostic helpers they share.
//
//   kcenter(x, offsets, k, first, metric)  greedy k-center (max-min) per image; -> [B, k] selection order
//   maxsum(x, offsets, k, first)           greedy max-sum (min summed cosine) per image; -> [B, k]
//   dart_pick(units, pivots, excluded, counts)
//                                          DART: per pivot, the counts[t] available tokens least cosine-similar
//                                          to it; -> picks in pivot order
//   dbdpc(dist, rank, cutoff)              DBDPC centres + nearest-centre labels (PACT); -> [N] centre index
//
// x holds the images' token features stacked ([T, D], image b is rows offsets[b] .. offsets[b+1]-1),
// first[b] = -1 asks for DivPrune's first pick (the token whose nearest neighbour is farthest).
// The math of each op, and the pure-torch reference it must agree with, is in vtprune/functional.
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "vtprune.h"

extern "C" {
// `import vtprune._C` loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

namespace vtprune {

void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
                   " must be float32 or float64 (the compute dtype: upcast bf16/fp16 first), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be 2-D [tokens, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, name, " must have D >= 1 features, got shape ", x.sizes());
}

std::vector<int64_t> check_offsets(const at::Tensor& x, at::IntArrayRef offsets, int64_t k, at::IntArrayRef first) {
  check_features(x, "x");
  TORCH_CHECK_VALUE(offsets.size() >= 2, "offsets must hold B + 1 >= 2 row offsets (one image at least), got ",
                    offsets);
  TORCH_CHECK_VALUE(offsets.front() == 0 && offsets.back() == x.size(0),
                    "offsets must start at 0 and end at x.size(0) = ", x.size(0), ", got ", offsets);
  const int64_t images = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK_VALUE(static_cast<int64_t>(first.size()) == images, "first must have one entry per image (", images,
                    "; -1 = DivPrune's rule), got ", first.size());
  int64_t smallest = std::numeric_limits<int64_t>::max();
  for (int64_t b = 0; b < images; ++b) {
    const int64_t n = offsets[b + 1] - offsets[b];
    TORCH_CHECK_VALUE(n >= 1, "every image needs at least one token: offsets must increase, got ", offsets);
    TORCH_CHECK_VALUE(first[b] >= -1 && first[b] < n, "first[", b, "] must be in [-1, ", n - 1, "], got ", first[b]);
    smallest = std::min(smallest, n);
  }
  TORCH_CHECK_VALUE(k >= 1 && k <= smallest, "k must be in [1, ", smallest,
                    "] (the number of tokens of the smallest image), got ", k);
  return std::vector<int64_t>(offsets.begin(), offsets.end());
}

bool check_metric(c10::string_view metric) {
  TORCH_CHECK_VALUE(metric == "cosine" || metric == "l2", "metric must be 'cosine' or 'l2', got '",
                    std::string(metric), "'");
  return metric == "l2";
}

void check_dart(const at::Tensor& units, const at::Tensor& pivots, const at::Tensor& excluded,
                at::IntArrayRef counts) {
  check_features(units, "units");
  check_features(pivots, "pivots");
  TORCH_CHECK_TYPE(pivots.scalar_type() == units.scalar_type(), "pivots must have the dtype of units (",
                   units.scalar_type(), "), got ", pivots.scalar_type());
  TORCH_CHECK_VALUE(pivots.size(1) == units.size(1), "pivots must be [P, D] with D = ", units.size(1),
                    ", got shape ", pivots.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(counts.size()) == pivots.size(0), "counts must have one entry per pivot (",
                    pivots.size(0), "), got ", counts.size());
  for (auto c : counts) TORCH_CHECK_VALUE(c >= 0, "counts must be >= 0, got ", counts);
  TORCH_CHECK_TYPE(excluded.scalar_type() == at::kLong, "excluded must be int64, got ", excluded.scalar_type());
  TORCH_CHECK_VALUE(excluded.dim() == 1 && excluded.size(0) <= units.size(0),
                    "excluded must be 1-D with at most ", units.size(0), " entries, got shape ", excluded.sizes());
  TORCH_CHECK_VALUE(units.device() == pivots.device() && units.device() == excluded.device(),
                    "units, pivots and excluded must be on one device, got ", units.device(), ", ", pivots.device(),
                    " and ", excluded.device());
}

void check_dbdpc(const at::Tensor& dist, const at::Tensor& rank, double cutoff) {
  TORCH_CHECK_TYPE(dist.scalar_type() == at::kFloat || dist.scalar_type() == at::kDouble,
                   "dist must be float32 or float64, got ", dist.scalar_type());
  TORCH_CHECK_VALUE(dist.dim() == 2 && dist.size(0) == dist.size(1) && dist.size(0) >= 1,
                    "dist must be a square [N, N] distance matrix with N >= 1, got shape ", dist.sizes());
  TORCH_CHECK_TYPE(rank.scalar_type() == at::kLong, "rank must be int64, got ", rank.scalar_type());
  TORCH_CHECK_VALUE(rank.dim() == 1 && rank.size(0) == dist.size(0), "rank must be [N] with N = ", dist.size(0),
                    ", got shape ", rank.sizes());
  TORCH_CHECK_VALUE(rank.device() == dist.device(), "dist and rank must be on one device, got ", dist.device(),
                    " and ", rank.device());
  TORCH_CHECK_VALUE(std::isfinite(cutoff) && cutoff >= 0.0, "cutoff must be a finite number >= 0, got ", cutoff);
}

at::Tensor unit_rows(const at::Tensor& x) {
  return x / at::linalg_vector_norm(x, 2, {-1}, /*keepdim=*/true).clamp_min(kCosineEps);
}

at::Tensor farthest_nearest_neighbour(const at::Tensor& x, bool l2) {
  const int64_t n = x.size(0);
  if (n == 1) return at::zeros({1}, x.options().dtype(at::kLong));
  const double eps = x.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                    : static_cast<double>(std::numeric_limits<float>::epsilon());
  const double tol = 4.0 * std::sqrt(static_cast<double>(std::max<int64_t>(x.size(1), 1))) * eps;
  at::Tensor nn = at::empty({n}, x.options());
  at::Tensor sq = l2 ? x.square().sum(1) : at::Tensor();
  const int64_t step = std::max<int64_t>(1, kBlockElements / n);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t b = std::min(step, n - start);
    at::Tensor d = at::matmul(x.narrow(0, start, b), x.t());
    if (!l2) {
      d.neg_().add_(1.0).clamp_(0.0, 2.0);
      d.masked_fill_(d.le(tol), 0.0);
    } else {
      at::Tensor scale = sq.narrow(0, start, b).unsqueeze(1) + sq.unsqueeze(0);
      d.mul_(-2.0).add_(scale).clamp_(0.0);
      d.masked_fill_(d.le(scale.mul_(tol)), 0.0);
    }
    d.diagonal(start).fill_(std::numeric_limits<double>::infinity());
    nn.narrow(0, start, b).copy_(std::get<0>(d.min(1)));
  }
  return at::argmax(nn).view({1});
}

at::Tensor first_picks(const at::Tensor& prepared, const std::vector<int64_t>& offsets, at::IntArrayRef first,
                       bool l2) {
  std::vector<at::Tensor> picks;
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    if (first[b] >= 0) {
      picks.push_back(at::full({1}, first[b], prepared.options().dtype(at::kLong)));
    } else {
      picks.push_back(farthest_nearest_neighbour(prepared.narrow(0, offsets[b], offsets[b + 1] - offsets[b]), l2));
    }
  }
  return at::cat(picks);
}

}  // namespace vtprune

TORCH_LIBRARY(vtprune, m) {
  m.def("kcenter(Tensor x, int[] offsets, int k, int[] first, str metric) -> Tensor");
  m.def("maxsum(Tensor x, int[] offsets, int k, int[] first) -> Tensor");
  m.def("dart_pick(Tensor units, Tensor pivots, Tensor excluded, int[] counts) -> Tensor");
  m.def("dbdpc(Tensor dist, Tensor rank, float cutoff) -> Tensor");
}
