// NVRTC entry points of the greedy selection kernels: C names per mode and dtype (nvrtc.KERNELS["select"]) around
// the device code of select.cuh, which the nvcc extension (csrc/cuda/select.cu) wraps in the same way.
#include "select.cuh"

#define VT_STEP(NAME, T, MODE)                                                                                      \
  extern "C" __global__ void __launch_bounds__(VT_THREADS)                                                          \
      NAME(const T* x, const i64* offsets, i64 d, T* state, const i64* firsts, const T* prev_val,                   \
           const i64* prev_idx, T* part_val, i64* part_idx, int nblocks, i64* out, i64 k, i64 t) {                  \
    greedy_step<T, MODE>(x, offsets, d, state, firsts, prev_val, prev_idx, part_val, part_idx, nblocks, out, k, t); \
  }
VT_STEP(greedy_step_cosine_f32, float, kCosine)
VT_STEP(greedy_step_cosine_f64, double, kCosine)
VT_STEP(greedy_step_l2_f32, float, kL2)
VT_STEP(greedy_step_l2_f64, double, kL2)
VT_STEP(greedy_step_maxsum_f32, float, kMaxSum)
VT_STEP(greedy_step_maxsum_f64, double, kMaxSum)

extern "C" __global__ void greedy_finish_f32(const float* val, const i64* idx, int nblocks, int maximize, i64* out,
                                             i64 k) {
  greedy_finish<float>(val, idx, nblocks, maximize, out, k);
}
extern "C" __global__ void greedy_finish_f64(const double* val, const i64* idx, int nblocks, int maximize, i64* out,
                                             i64 k) {
  greedy_finish<double>(val, idx, nblocks, maximize, out, k);
}
extern "C" __global__ void __launch_bounds__(VT_THREADS)
    dart_sims_f32(const float* units, const float* pivot, const u8* available, i64 n, i64 d, float* sims) {
  dart_sims<float>(units, pivot, available, n, d, sims);
}
extern "C" __global__ void __launch_bounds__(VT_THREADS)
    dart_sims_f64(const double* units, const double* pivot, const u8* available, i64 n, i64 d, double* sims) {
  dart_sims<double>(units, pivot, available, n, d, sims);
}
