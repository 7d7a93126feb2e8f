// Hidden-state MSE row kernel on CUDA: one read of each (projected) row, the gradient written in
// place, deterministic partial sums (fixed row chunks, fixed-order reductions). The element math
// is csrc/hidden_mse_math.h, shared with the CPU kernel.
#include <cuda_runtime.h>

#include "hidden_mse.cuh"
#include "hidden_mse_math.h"

namespace kdfast::cuda {
namespace {

constexpr int kColumns = 64;                  // columns per block, one per thread lane
constexpr int kRowGroups = 4;                 // 256 threads = 64 columns x 4 row groups
constexpr int kThreads = kColumns * kRowGroups;

__global__ void __launch_bounds__(kThreads) rows_kernel(const float* y, index_t y_ld, const float* t, index_t t_ld,
                                                        const uint8_t* row_mask, index_t rows, index_t width,
                                                        float grad_scale, float* grad, index_t grad_ld,
                                                        double* loss_part, float* column_part) {
  __shared__ double loss_shared[kThreads];
  __shared__ float column_shared[kThreads];
  const int lane = threadIdx.x % kColumns, group = threadIdx.x / kColumns;
  const index_t c = blockIdx.y * kColumns + lane;
  const index_t first = blockIdx.x * kHiddenMseChunk;
  const index_t last = first + kHiddenMseChunk < rows ? first + kHiddenMseChunk : rows;
  double loss = 0.0;
  float column = 0.0f;
  if (c < width) {
    for (index_t r = first + group; r < last; r += kRowGroups) {
      float g = 0.0f;
      if (row_mask == nullptr || row_mask[r]) {
        loss += hidden_mse_square(y[r * y_ld + c], t[r * t_ld + c]);
        g = hidden_mse_grad(y[r * y_ld + c], t[r * t_ld + c], grad_scale);
      }
      grad[r * grad_ld + c] = g;
      column += g;
    }
  }
  loss_shared[threadIdx.x] = loss;
  column_shared[threadIdx.x] = column;
  __syncthreads();
  if (group == 0) {
    for (int k = 1; k < kRowGroups; ++k) {
      loss += loss_shared[k * kColumns + lane];
      column += column_shared[k * kColumns + lane];
    }
    loss_shared[lane] = loss;
    if (column_part != nullptr && c < width) column_part[blockIdx.x * width + c] = column;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int k = 0; k < kColumns; ++k) total += loss_shared[k];
    loss_part[blockIdx.x * gridDim.y + blockIdx.y] = total;
  }
}

}  // namespace

int64_t hidden_mse_chunk_rows() { return kHiddenMseChunk; }
int64_t hidden_mse_column_block() { return kColumns; }

const char* hidden_mse_rows_launch(std::uintptr_t y, int64_t y_ld, std::uintptr_t t, int64_t t_ld,
                                   std::uintptr_t row_mask, int64_t rows, int64_t width, double grad_scale,
                                   std::uintptr_t grad, int64_t grad_ld, std::uintptr_t loss_part,
                                   std::uintptr_t column_part, std::uintptr_t stream) {
  const dim3 grid((rows + kHiddenMseChunk - 1) / kHiddenMseChunk, (width + kColumns - 1) / kColumns);
  if (grid.x > 0 && grid.y > 0)
    rows_kernel<<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const float*>(y), y_ld, reinterpret_cast<const float*>(t), t_ld,
        reinterpret_cast<const uint8_t*>(row_mask), rows, width, static_cast<float>(grad_scale),
        reinterpret_cast<float*>(grad), grad_ld, reinterpret_cast<double*>(loss_part),
        reinterpret_cast<float*>(column_part));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace kdfast::cuda
