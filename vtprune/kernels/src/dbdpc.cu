// DBDPC (PACT) kernels for NVRTC: centre finding in one thread block (rounds, then the sequential densest-first
// pass, all on the device), then nearest-centre labels in a grid. The device code of csrc/cuda/dbdpc.cu (same
// rules as csrc/cpu/dbdpc.cpp), with C entry points per dtype; launcher in vtprune/kernels/nvrtc.py.
// Launch: centres grid = 1, block = VT_DBDPC_BLOCK; labels grid = ceil(n / VT_LABEL_BLOCK), block = VT_LABEL_BLOCK.
#define VT_DBDPC_BLOCK 1024
#define VT_LABEL_BLOCK 256
#define VT_SEQUENTIAL_BELOW 10  // keep in sync with vtprune/functional/cluster.py SEQUENTIAL_BELOW

enum : i8 { kFree = 0, kAssigned = 1, kCentre = 2, kFresh = 3 };

template <typename T>
__device__ void centres(const T* __restrict__ dist, const i64* __restrict__ rank, const i64* __restrict__ by_rank,
                        i64 n, T cutoff, i8* state, T* delta) {
  __shared__ int fresh_count;
  __shared__ int free_count;
  for (;;) {
    // delta_i over the free tokens, new centres marked kFresh
    if (threadIdx.x == 0) fresh_count = 0;
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
      if (state[i] != kFree) continue;
      const T* row = dist + i * n;
      T best = Lim<T>::inf();
      for (i64 j = 0; j < n; ++j)
        if (state[j] == kFree && rank[j] < rank[i] && row[j] < best) best = row[j];
      delta[i] = best;
    }
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFree && delta[i] > cutoff) {
        state[i] = kFresh;
        atomicAdd(&fresh_count, 1);
      }
    __syncthreads();
    // free tokens within cutoff of a new centre are assigned
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
      if (state[i] != kFree) continue;
      const T* row = dist + i * n;
      for (i64 c = 0; c < n; ++c)
        if (state[c] == kFresh && row[c] <= cutoff) {
          state[i] = kAssigned;
          break;
        }
    }
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFresh) state[i] = kCentre;
    if (threadIdx.x == 0) free_count = 0;
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x)
      if (state[i] == kFree) atomicAdd(&free_count, 1);
    __syncthreads();
    if (free_count == 0) return;
    if (fresh_count < VT_SEQUENTIAL_BELOW) break;
  }
  // sequential pass over the free tokens, densest first
  for (i64 p = 0; p < n; ++p) {
    const i64 c = by_rank[p];
    if (state[c] != kFree) continue;  // block-uniform: state[c] is only written before the barrier below
    __syncthreads();
    if (threadIdx.x == 0) state[c] = kCentre;
    const T* row = dist + c * n;
    for (i64 j = threadIdx.x; j < n; j += blockDim.x)
      if (j != c && state[j] == kFree && rank[j] > p && row[j] <= cutoff) state[j] = kAssigned;
    __syncthreads();
  }
}

template <typename T>
__device__ void labels(const T* __restrict__ dist, const i8* __restrict__ state, i64 n, i64* __restrict__ out) {
  const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (state[i] == kCentre) {
    out[i] = i;
    return;
  }
  const T* row = dist + i * n;
  i64 best = -1;
  for (i64 c = 0; c < n; ++c)
    if (state[c] == kCentre && (best < 0 || row[c] < row[best])) best = c;
  out[i] = best;
}

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
