// The element-wise and per-row parts of the training binary's MLP on a GPU (ringlet-train's
// `--device gpu`); the matrix products are cuBLAS's. f32 matrices are row-major [rows, cols].
// Each kernel has a CPU twin in ringlet-train's model (its `Host` backend) and sums in the same
// order as it. None uses shared memory, atomics or synchronisation, so a result never depends on
// the launch shape, and ringlet-train's tests can run this file on the CPU through a host shim.
typedef unsigned long long u64;
typedef unsigned int u32;

#define GRID_STRIDE(i, n) \
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

// out[r, j] = bias[j]: a layer's output starts as its bias, then the GEMM adds input · Wᵀ.
extern "C" __global__ void fill_rows_f32(float* __restrict__ out, const float* __restrict__ bias,
                                         u64 rows, u64 cols) {
  GRID_STRIDE(i, rows * cols) out[i] = bias[i % cols];
}

// x = x where positive, else +0 (NaN and -0 included).
extern "C" __global__ void relu_f32(float* x, u64 n) {
  GRID_STRIDE(i, n) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

// The ReLU's backward: delta = 0 where the ReLU's output was not positive.
extern "C" __global__ void relu_mask_f32(float* __restrict__ delta, const float* __restrict__ act,
                                         u64 n) {
  GRID_STRIDE(i, n) if (!(act[i] > 0.0f)) delta[i] = 0.0f;
}

// out[j] = sum over r of m[r, j], rows in order (a bias's gradient). One thread per column:
// neighbouring threads read neighbouring addresses.
extern "C" __global__ void column_sums_f32(const float* __restrict__ m, float* __restrict__ out,
                                           u64 rows, u64 cols) {
  GRID_STRIDE(j, cols) {
    float s = 0.0f;
    for (u64 r = 0; r < rows; r++) s += m[r * cols + j];
    out[j] = s;
  }
}

// Per row of logits: the softmax cross-entropy (accumulated in double) and whether the arg max
// (the first, on ties) is the label. A label out of range gives a NaN loss.
extern "C" __global__ void softmax_loss_f32(const float* __restrict__ logits,
                                            const u32* __restrict__ labels, double* __restrict__ loss,
                                            u32* __restrict__ correct, u64 rows, u64 classes) {
  GRID_STRIDE(r, rows) {
    const float* z = logits + r * classes;
    u32 label = labels[r];
    if (label >= classes) {
      loss[r] = __longlong_as_double(0x7ff8000000000000ULL);  // NaN
      correct[r] = 0;
      continue;
    }
    float max = __int_as_float(0xff800000);  // -infinity
    u64 best = 0;
    for (u64 j = 0; j < classes; j++) {
      max = fmaxf(max, z[j]);
      if (z[j] > z[best]) best = j;
    }
    double sum = 0.0;
    for (u64 j = 0; j < classes; j++) sum += exp((double)(z[j] - max));
    loss[r] = log(sum) - (double)(z[label] - max);
    correct[r] = best == label ? 1u : 0u;
  }
}

// d(loss)/d(logits) of the summed loss: softmax(z) - onehot(label), per row, in f32.
extern "C" __global__ void softmax_grad_f32(const float* __restrict__ logits,
                                            const u32* __restrict__ labels, float* __restrict__ delta,
                                            u64 rows, u64 classes) {
  GRID_STRIDE(r, rows) {
    const float* z = logits + r * classes;
    float* d = delta + r * classes;
    float max = __int_as_float(0xff800000);  // -infinity
    for (u64 j = 0; j < classes; j++) max = fmaxf(max, z[j]);
    float sum = 0.0f;
    for (u64 j = 0; j < classes; j++) {
      d[j] = expf(z[j] - max);
      sum += d[j];
    }
    for (u64 j = 0; j < classes; j++) d[j] = d[j] / sum;
    if (labels[r] < classes) d[labels[r]] -= 1.0f;
  }
}
