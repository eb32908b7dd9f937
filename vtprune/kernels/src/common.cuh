// Shared helpers of vtprune's device code (plain CUDA C++: no host code, no torch, no standard headers under NVRTC,
// so NVRTC compiles it with no toolkit installed); the same rules as csrc/cpu/rows.h. Included by select.cuh and
// dbdpc.cuh, which both back ends compile: NVRTC (nvrtc.py expands the #include lines) and nvcc (csrc/cuda/*.cu).
#ifndef VTPRUNE_COMMON_CUH
#define VTPRUNE_COMMON_CUH
#ifdef __CUDACC_RTC__
typedef long long i64;  // NVRTC: no <cstdint>
#else
#include <cstdint>
typedef int64_t i64;  // nvcc: the type of at::Tensor::data_ptr<int64_t>()
#endif
typedef unsigned char u8;
typedef signed char i8;

template <typename T>
struct Lim;
template <>
struct Lim<float> {
  __device__ static float inf() { return __int_as_float(0x7f800000); }
  __device__ static float eps() { return 1.1920928955078125e-07f; }  // FLT_EPSILON
};
template <>
struct Lim<double> {
  __device__ static double inf() { return __longlong_as_double(0x7ff0000000000000LL); }
  __device__ static double eps() { return 2.220446049250313e-16; }  // DBL_EPSILON
};

// std::min / std::max semantics (the CPU kernels' clamps)
template <typename T>
__device__ __forceinline__ T vt_min(T a, T b) { return b < a ? b : a; }
template <typename T>
__device__ __forceinline__ T vt_max(T a, T b) { return a < b ? b : a; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Is (v1, i1) a better candidate than (v2, i2)? Index -1 means "none"; ties go to the lower index.
template <typename T>
__device__ __forceinline__ bool better(T v1, i64 i1, T v2, i64 i2, bool maximize) {
  if (i1 < 0) return false;
  if (i2 < 0) return true;
  if (v1 == v2) return i1 < i2;
  return maximize ? v1 > v2 : v1 < v2;
}

#endif  // VTPRUNE_COMMON_CUH
