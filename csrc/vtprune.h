// Shared declarations of vtprune's native ops (schemas live in ops.cpp, declared once).
//
// Device-agnostic preparation steps (unit rows, the DivPrune first pick) are written with ATen calls that
// mirror vtprune/functional line by line, so the native and the pure-torch paths see bitwise identical
// inputs to their greedy loops; only the loops themselves are native.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace vtprune {

// Keep in sync with vtprune/functional/_common.py.
constexpr double kCosineEps = 1e-8;
constexpr int64_t kBlockElements = int64_t(1) << 24;

// Argument checks shared by the CPU and CUDA kernels (ValueError / TypeError on the Python side).
void check_features(const at::Tensor& x, const char* name);
std::vector<int64_t> check_offsets(const at::Tensor& x, at::IntArrayRef offsets, int64_t k, at::IntArrayRef first);
bool check_metric(c10::string_view metric);  // true for "l2", false for "cosine"
void check_dart(const at::Tensor& units, const at::Tensor& pivots, const at::Tensor& excluded, at::IntArrayRef counts);
void check_dbdpc(const at::Tensor& dist, const at::Tensor& rank, double cutoff);

// x / max(||x||_2, 1e-8), row-wise (vtprune.functional._common.unit_rows).
at::Tensor unit_rows(const at::Tensor& x);
// argmax_i min_{j != i} d(i, j) on unit rows (cosine) or raw rows (l2), as a [1] long tensor
// (vtprune.functional.diversity._farthest_nearest_neighbour).
at::Tensor farthest_nearest_neighbour(const at::Tensor& x, bool l2);
// Per image b: the row-prepared slice (unit rows for cosine) and its first pick (given or DivPrune's rule),
// returned as a long tensor [B] on x's device.
at::Tensor first_picks(const at::Tensor& prepared, const std::vector<int64_t>& offsets, at::IntArrayRef first,
                       bool l2);

// Backend kernels (CPU in csrc/cpu, CUDA in csrc/cuda).
at::Tensor kcenter_cpu(const at::Tensor& x, at::IntArrayRef offsets, int64_t k, at::IntArrayRef first,
                       c10::string_view metric);
at::Tensor maxsum_cpu(const at::Tensor& x, at::IntArrayRef offsets, int64_t k, at::IntArrayRef first);
at::Tensor dart_pick_cpu(const at::Tensor& units, const at::Tensor& pivots, const at::Tensor& excluded,
                         at::IntArrayRef counts);
at::Tensor dbdpc_cpu(const at::Tensor& dist, const at::Tensor& rank, double cutoff);

}  // namespace vtprune
