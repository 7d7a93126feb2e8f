// CUDA vocabulary-KD row kernel: one block per row, the arithmetic of csrc/vocab_kd_math.h.
//   pass 1: every thread keeps online (max, sum) states over its strided elements; warp shuffles
//           then shared memory merge them into the row's softmax normalisers;
//   pass 2: every thread writes d loss / d s over its elements and sums its KD terms; one block sum.
#include <cuda_runtime.h>

#include "vocab_kd.cuh"
#include "vocab_kd_math.h"

namespace kdfast::cuda {
namespace {

using vocab_kd::OnlineSum;
using vocab_kd::RowStats;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ OnlineSum warp_merge(OnlineSum x, float scale) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const OnlineSum other{__shfl_xor_sync(kFullMask, x.max, offset), __shfl_xor_sync(kFullMask, x.sum, offset)};
    x = vocab_kd::online_merge(x, other, scale);
  }
  return x;
}

// Every thread gets the merged state of the block. `scratch` holds kWarps states.
__device__ OnlineSum block_merge(OnlineSum x, float scale, OnlineSum* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_merge(x, scale);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kWarps ? scratch[lane] : vocab_kd::online_empty();
  x = warp_merge(x, scale);
  __syncthreads();  // scratch may be reused right after
  return x;
}

__device__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kWarps ? scratch[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__global__ void __launch_bounds__(kThreads)
vocab_kd_rows_kernel(float* __restrict__ s_all, const float* __restrict__ t_all, const int64_t* __restrict__ labels,
                     const float* __restrict__ kd_coef, const float* __restrict__ mlm_coef,
                     float* __restrict__ kd_row, float* __restrict__ mlm_row, int64_t vocab, int64_t ld,
                     float temperature, bool soft_ce) {
  __shared__ OnlineSum scratch[kWarps];
  __shared__ float sum_scratch[kWarps];
  const int64_t row = blockIdx.x;
  float* s = s_all + row * ld;
  const float* t = t_all + row * ld;
  const int64_t label = labels[row];
  const bool has_label = label >= 0;
  const float inv_t = 1.0f / temperature;
  const bool raw_softmax = has_label && temperature != 1.0f;

  OnlineSum a = vocab_kd::online_empty(), b = vocab_kd::online_empty(), raw = vocab_kd::online_empty();
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float sv = s[v];
    a = vocab_kd::online_add(a, sv, inv_t);
    b = vocab_kd::online_add(b, t[v], inv_t);
    if (raw_softmax) raw = vocab_kd::online_add(raw, sv, 1.0f);
  }
  a = block_merge(a, inv_t, scratch);
  b = block_merge(b, inv_t, scratch);
  if (raw_softmax) raw = block_merge(raw, 1.0f, scratch);

  const RowStats st = vocab_kd::row_stats(a, b, raw, temperature, has_label, kd_coef[row], mlm_coef[row], soft_ce);
  const float s_label = has_label ? s[label] : 0.0f;  // read before pass 2 overwrites it
  __syncthreads();

  float kd = 0.0f;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const vocab_kd::ElementOut out = vocab_kd::element_grad(s[v], t[v], st);
    s[v] = out.grad;
    kd += out.kd_term;
  }
  kd = block_sum(kd, sum_scratch);  // its __syncthreads also orders pass 2's writes before the label fix
  if (threadIdx.x == 0) {
    if (has_label) s[label] -= st.mlm_coef;
    kd_row[row] = kd;
    mlm_row[row] = has_label ? vocab_kd::mlm_loss(st, s_label) : 0.0f;
  }
}

}  // namespace

const char* vocab_kd_rows(float* s, const float* t, const int64_t* labels, const float* kd_coef,
                          const float* mlm_coef, float* kd_row, float* mlm_row, int64_t rows, int64_t vocab,
                          int64_t ld, float temperature, bool soft_ce, std::uintptr_t stream) {
  if (rows == 0) return nullptr;
  cudaGetLastError();  // clear an earlier, unrelated error
  vocab_kd_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row, vocab, ld, temperature, soft_ce);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace kdfast::cuda
