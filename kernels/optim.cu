// Optimizer updates of f32 parameters, fused with the gradient's scaling (the all-reduced sum
// times 1 / global batch). Compiled with --fmad=false so that every step rounds like the Rust
// reference (ringlet_train::optim), bit for bit.
typedef unsigned long long u64;

// PyTorch's SGD (dampening 0, no Nesterov): d = g*scale + wd*p; v = momentum*v + d; p -= lr*v.
extern "C" __global__ void sgd_momentum_f32(float* __restrict__ p, const float* __restrict__ g,
                                            float* __restrict__ v, u64 n, float lr, float momentum,
                                            float weight_decay, float grad_scale) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) {
    float d = g[i] * grad_scale + weight_decay * p[i];
    float vi = momentum * v[i] + d;
    v[i] = vi;
    p[i] = p[i] - lr * vi;
  }
}

// AdamW (decoupled weight decay, PyTorch's order): p *= 1 - lr*wd; m, v moments; p -= lr *
// (m/bias1) / (sqrt(v/bias2) + eps), with bias1 = 1 - beta1^t and bias2 = 1 - beta2^t from the host.
extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v, u64 n, float lr,
                                     float beta1, float beta2, float eps, float weight_decay,
                                     float grad_scale, float bias1, float bias2) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) {
    float gi = g[i] * grad_scale;
    float pi = p[i] * (1.0f - lr * weight_decay);
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - lr * (mi / bias1) / (sqrtf(vi / bias2) + eps);
  }
}
