// Element-wise reductions of the collectives: acc[i] = op(acc[i], in[i]), and the division of an
// average. Each kernel must give the same bits as the host ring (ringlet-core's reducers):
//   - f16/bf16 are widened to f32, combined, rounded back once (round to nearest even);
//   - integer sum and prod wrap (computed on the unsigned type: signed overflow is undefined);
//   - min/max of floats are IEEE minNum/maxNum (fmin/fmax: a NaN operand loses), as Rust's min/max;
//   - avg divides (not multiplies by 1/n), integers truncating toward zero.
// Kernels are grid-stride loops; names are `<op>_<type>` and `divide_<type>`.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned char u8;

__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T narrow(float x);
template <> __device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Sum  { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct Prod { template <typename T> __device__ T operator()(T a, T b) const { return a * b; } };
struct Min  { template <typename T> __device__ T operator()(T a, T b) const { return ::fmin(a, b); } };
struct Max  { template <typename T> __device__ T operator()(T a, T b) const { return ::fmax(a, b); } };

// Integers: sum and prod wrap; min and max compare as signed (or unsigned for u8).
template <typename T, typename U> struct Wrap {
  __device__ static T sum(T a, T b) { return (T)((U)a + (U)b); }
  __device__ static T prod(T a, T b) { return (T)((U)a * (U)b); }
};

template <typename T, typename F> __device__ void each(T* __restrict__ acc, const T* __restrict__ in, u64 n, F f) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) {
    acc[i] = f(acc[i], in[i]);
  }
}

#define FLOAT_REDUCE(T, NAME)                                                                              \
  extern "C" __global__ void sum_##NAME(T* acc, const T* in, u64 n) { each(acc, in, n, Sum()); }          \
  extern "C" __global__ void prod_##NAME(T* acc, const T* in, u64 n) { each(acc, in, n, Prod()); }        \
  extern "C" __global__ void min_##NAME(T* acc, const T* in, u64 n) { each(acc, in, n, Min()); }          \
  extern "C" __global__ void max_##NAME(T* acc, const T* in, u64 n) { each(acc, in, n, Max()); }          \
  extern "C" __global__ void divide_##NAME(T* x, u64 n, i64 d) {                                           \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x)    \
      x[i] = x[i] / (T)d;                                                                                 \
  }
FLOAT_REDUCE(float, f32)
FLOAT_REDUCE(double, f64)

#define HALF_REDUCE(T, NAME)                                                                               \
  template <typename F> __device__ void each_##NAME(T* acc, const T* in, u64 n, F f) {                     \
    each(acc, in, n, [f](T a, T b) { return narrow<T>(f(widen(a), widen(b))); });              \
  }                                                                                                        \
  extern "C" __global__ void sum_##NAME(T* acc, const T* in, u64 n) { each_##NAME(acc, in, n, Sum()); }   \
  extern "C" __global__ void prod_##NAME(T* acc, const T* in, u64 n) { each_##NAME(acc, in, n, Prod()); } \
  extern "C" __global__ void min_##NAME(T* acc, const T* in, u64 n) { each_##NAME(acc, in, n, Min()); }   \
  extern "C" __global__ void max_##NAME(T* acc, const T* in, u64 n) { each_##NAME(acc, in, n, Max()); }   \
  extern "C" __global__ void divide_##NAME(T* x, u64 n, i64 d) {                                           \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x)    \
      x[i] = narrow<T>(widen(x[i]) / (float)d);                                                           \
  }
HALF_REDUCE(__half, f16)
HALF_REDUCE(__nv_bfloat16, bf16)

#define INT_REDUCE(T, U, NAME)                                                                             \
  extern "C" __global__ void sum_##NAME(T* acc, const T* in, u64 n) {                                      \
    each(acc, in, n, [](T a, T b) { return Wrap<T, U>::sum(a, b); });                          \
  }                                                                                                        \
  extern "C" __global__ void prod_##NAME(T* acc, const T* in, u64 n) {                                     \
    each(acc, in, n, [](T a, T b) { return Wrap<T, U>::prod(a, b); });                         \
  }                                                                                                        \
  extern "C" __global__ void min_##NAME(T* acc, const T* in, u64 n) {                                      \
    each(acc, in, n, [](T a, T b) { return b < a ? b : a; });                                  \
  }                                                                                                        \
  extern "C" __global__ void max_##NAME(T* acc, const T* in, u64 n) {                                      \
    each(acc, in, n, [](T a, T b) { return b > a ? b : a; });                                  \
  }                                                                                                        \
  extern "C" __global__ void divide_##NAME(T* x, u64 n, i64 d) {                                           \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x)    \
      x[i] = (T)((i64)x[i] / d);                                                                          \
  }
INT_REDUCE(int, unsigned int, i32)
INT_REDUCE(i64, u64, i64)
INT_REDUCE(u8, u8, u8)
