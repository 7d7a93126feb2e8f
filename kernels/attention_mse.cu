// TinyBERT attention-score MSE by Gram algebra on CUDA, all products and sums in float64
// (see csrc/attention_mse_math.h; the operand loads are the CPU kernel's mse_operand_at).
// 1. gram_kernel: a 32x32 tile of G = P^T P per block, P = X or Y, looping over L in 32-row slabs.
// 2. energy_kernel: <GQ, GK> per head, one block each, fixed-order tree reduction (deterministic).
// 3. grad_kernel: a 32x32 tile of scale * (P G)[:, :d_s] per block.
#include <cuda_runtime.h>

#include "attention_mse.cuh"
#include "attention_mse_math.h"

namespace kdfast::cuda {
namespace {

constexpr int kTile = 32;      // output tile edge and slab depth
constexpr int kThreads = 256;  // each thread owns 4 outputs of a 32x32 tile

struct Dims {
  index_t heads, length, d_s, d_t, n_pad;
};

// slab[r][c] = operand entry (row0 + r, col0 + c) of head bh, float64.
__device__ void load_slab(double (*slab)[kTile + 1], const MseOperand& p, const Dims& dims, index_t bh,
                          index_t row0, index_t col0) {
  const index_t b = bh / dims.heads, h = bh % dims.heads;
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, c = i % kTile;
    slab[r][c] = mse_operand_at(p, b, h, row0 + r, col0 + c, dims.length, dims.d_s, dims.d_t);
  }
}

__global__ void __launch_bounds__(kThreads) gram_kernel(MseOperand p, Dims dims, double* gram) {
  __shared__ double left[kTile][kTile + 1];
  __shared__ double right[kTile][kTile + 1];
  const index_t bh = blockIdx.z, col_i = blockIdx.x * kTile, col_j = blockIdx.y * kTile;
  const int tj = threadIdx.x % kTile, ti = threadIdx.x / kTile;  // outputs (ti + 8 m, tj), m < 4
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  for (index_t row0 = 0; row0 < dims.length; row0 += kTile) {
    load_slab(left, p, dims, bh, row0, col_i);
    load_slab(right, p, dims, bh, row0, col_j);
    __syncthreads();
    for (int r = 0; r < kTile; ++r)
      for (int m = 0; m < 4; ++m) acc[m] += left[r][ti + 8 * m] * right[r][tj];
    __syncthreads();
  }
  double* out = gram + bh * dims.n_pad * dims.n_pad;
  for (int m = 0; m < 4; ++m) out[(col_i + ti + 8 * m) * dims.n_pad + col_j + tj] = acc[m];
}

__global__ void __launch_bounds__(kThreads) energy_kernel(const double* gram_q, const double* gram_k, index_t n_pad,
                                                          double* head_energy) {
  __shared__ double partial[kThreads];
  const index_t base = blockIdx.x * n_pad * n_pad;
  double sum = 0.0;
  for (index_t i = threadIdx.x; i < n_pad * n_pad; i += kThreads) sum += gram_q[base + i] * gram_k[base + i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) head_energy[blockIdx.x] = partial[0];
}

__global__ void __launch_bounds__(kThreads) grad_kernel(MseOperand p, Dims dims, const double* gram, double scale,
                                                        float* out) {
  __shared__ double rows[kTile][kTile + 1];
  __shared__ double cols[kTile][kTile + 1];
  const index_t bh = blockIdx.z, row0 = blockIdx.x * kTile, col0 = blockIdx.y * kTile;
  const double* g = gram + bh * dims.n_pad * dims.n_pad;
  const int tj = threadIdx.x % kTile, ti = threadIdx.x / kTile;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  for (index_t k0 = 0; k0 < dims.n_pad; k0 += kTile) {
    load_slab(rows, p, dims, bh, row0, k0);
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads)
      cols[i / kTile][i % kTile] = g[(k0 + i / kTile) * dims.n_pad + col0 + i % kTile];
    __syncthreads();
    for (int k = 0; k < kTile; ++k)
      for (int m = 0; m < 4; ++m) acc[m] += rows[ti + 8 * m][k] * cols[k][tj];
    __syncthreads();
  }
  for (int m = 0; m < 4; ++m) {
    const index_t l = row0 + ti + 8 * m, c = col0 + tj;
    if (l < dims.length && c < dims.d_s) out[(bh * dims.length + l) * dims.d_s + c] = static_cast<float>(scale * acc[m]);
  }
}

MseOperand operand(const AttentionMseSide& side, double s_scale, double t_scale, std::uintptr_t mask,
                   std::array<int64_t, 2> mask_stride) {
  return MseOperand{reinterpret_cast<const float*>(side.student), reinterpret_cast<const float*>(side.teacher),
                    {side.s_stride[0], side.s_stride[1], side.s_stride[2], side.s_stride[3]},
                    {side.t_stride[0], side.t_stride[1], side.t_stride[2], side.t_stride[3]}, s_scale, t_scale,
                    reinterpret_cast<const uint8_t*>(mask), mask_stride[0], mask_stride[1]};
}

}  // namespace

int64_t attention_mse_padded_width(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

const char* attention_mse_launch(const AttentionMseSide& q, const AttentionMseSide& k, std::uintptr_t key_mask,
                                 std::array<int64_t, 2> mask_stride, std::array<int64_t, 5> sizes, double alpha_s,
                                 double alpha_t, double grad_scale_q, double grad_scale_k, std::uintptr_t gram_q,
                                 std::uintptr_t gram_k, std::uintptr_t head_energy, std::uintptr_t dq_s,
                                 std::uintptr_t dk_s, std::uintptr_t stream) {
  const index_t batch_heads = sizes[0] * sizes[1];
  const Dims dims{sizes[1], sizes[2], sizes[3], sizes[4], attention_mse_padded_width(sizes[3] + sizes[4])};
  const MseOperand x = operand(q, alpha_s, -alpha_t, 0, {0, 0});
  const MseOperand y = operand(k, 1.0, 1.0, key_mask, mask_stride);
  auto* gq = reinterpret_cast<double*>(gram_q);
  auto* gk = reinterpret_cast<double*>(gram_k);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 gram_grid(dims.n_pad / kTile, dims.n_pad / kTile, batch_heads);
  gram_kernel<<<gram_grid, kThreads, 0, s>>>(x, dims, gq);
  gram_kernel<<<gram_grid, kThreads, 0, s>>>(y, dims, gk);
  energy_kernel<<<batch_heads, kThreads, 0, s>>>(gq, gk, dims.n_pad, reinterpret_cast<double*>(head_energy));
  if (dq_s != 0) {
    const dim3 grad_grid((dims.length + kTile - 1) / kTile, (dims.d_s + kTile - 1) / kTile, batch_heads);
    grad_kernel<<<grad_grid, kThreads, 0, s>>>(x, dims, gk, grad_scale_q, reinterpret_cast<float*>(dq_s));
    grad_kernel<<<grad_grid, kThreads, 0, s>>>(y, dims, gq, grad_scale_k, reinterpret_cast<float*>(dk_s));
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace kdfast::cuda
