// NVRTC entry points of the DBDPC kernels: C names per dtype (nvrtc.KERNELS["dbdpc"]) around the device code of
// dbdpc.cuh, which the nvcc extension (csrc/cuda/dbdpc.cu) wraps in the same way.
#include "dbdpc.cuh"

extern "C" __global__ void __launch_bounds__(VT_DBDPC_BLOCK)
    dbdpc_centres_f32(const float* dist, const i64* rank, const i64* by_rank, i64 n, float cutoff, i8* state,
                      float* delta) {
  centres<float>(dist, rank, by_rank, n, cutoff, state, delta);
}
extern "C" __global__ void __launch_bounds__(VT_DBDPC_BLOCK)
    dbdpc_centres_f64(const double* dist, const i64* rank, const i64* by_rank, i64 n, double cutoff, i8* state,
                      double* delta) {
  centres<double>(dist, rank, by_rank, n, cutoff, state, delta);
}
extern "C" __global__ void __launch_bounds__(VT_LABEL_BLOCK)
    dbdpc_labels_f32(const float* dist, const i8* state, i64 n, i64* out) {
  labels<float>(dist, state, n, out);
}
extern "C" __global__ void __launch_bounds__(VT_LABEL_BLOCK)
    dbdpc_labels_f64(const double* dist, const i8* state, i64 n, i64* out) {
  labels<double>(dist, state, n, out);
}
