// Just enough of CUDA C for the kernels of kernels/model.cu and kernels/optim.cu to compile as
// host C++: a launch runs every (block, thread) of the grid one after another. Valid only for
// kernels without shared memory, synchronisation or atomics, which those files promise.
#include <cmath>
#include <cstring>

struct ShimDim {
  unsigned x = 0, y = 0, z = 0;
};
// Per thread: tests may launch from several threads at once.
static thread_local ShimDim threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline

static inline float __int_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
static inline double __longlong_as_double(unsigned long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}

template <typename... P, typename... A>
static void shim_launch(void (*kernel)(P...), unsigned grid, unsigned block, A... args) {
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; b++) {
    for (unsigned t = 0; t < block; t++) {
      blockIdx.x = b;
      threadIdx.x = t;
      kernel(args...);
    }
  }
}
