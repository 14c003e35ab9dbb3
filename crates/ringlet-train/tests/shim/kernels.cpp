// The kernels of kernels/model.cu and kernels/optim.cu as host functions `host_<kernel>(grid,
// block, args...)`, for tests/kernels_on_host.rs. Built with -include cuda_host.h.
#include "model.cu"
#include "optim.cu"

extern "C" {
void host_fill_rows_f32(unsigned g, unsigned b, float* out, const float* bias, u64 rows, u64 cols) {
  shim_launch(fill_rows_f32, g, b, out, bias, rows, cols);
}
void host_relu_f32(unsigned g, unsigned b, float* x, u64 n) { shim_launch(relu_f32, g, b, x, n); }
void host_relu_mask_f32(unsigned g, unsigned b, float* delta, const float* act, u64 n) {
  shim_launch(relu_mask_f32, g, b, delta, act, n);
}
void host_column_sums_f32(unsigned g, unsigned b, const float* m, float* out, u64 rows, u64 cols) {
  shim_launch(column_sums_f32, g, b, m, out, rows, cols);
}
void host_softmax_loss_f32(unsigned g, unsigned b, const float* z, const u32* y, double* loss,
                           u32* correct, u64 rows, u64 classes) {
  shim_launch(softmax_loss_f32, g, b, z, y, loss, correct, rows, classes);
}
void host_softmax_grad_f32(unsigned g, unsigned b, const float* z, const u32* y, float* d, u64 rows,
                           u64 classes) {
  shim_launch(softmax_grad_f32, g, b, z, y, d, rows, classes);
}
void host_sgd_momentum_f32(unsigned g, unsigned b, float* p, const float* gr, float* v, u64 n,
                           float lr, float momentum, float wd, float scale) {
  shim_launch(sgd_momentum_f32, g, b, p, gr, v, n, lr, momentum, wd, scale);
}
void host_adamw_f32(unsigned g, unsigned b, float* p, const float* gr, float* m, float* v, u64 n,
                    float lr, float beta1, float beta2, float eps, float wd, float scale, float bias1,
                    float bias2) {
  shim_launch(adamw_f32, g, b, p, gr, m, v, n, lr, beta1, beta2, eps, wd, scale, bias1, bias2);
}
}
