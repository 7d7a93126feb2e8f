// CUDA vocabulary-KD row kernel: one block per row, the arithmetic of csrc/vocab_kd_math.h.
//   pass 1: every thread keeps online (max, sum) states over its strided elements; warp shuffles
//           then shared memory merge them into the row's softmax normalisers;
//   pass 2: every thread writes d loss / d s over its elements and sums its KD terms; one block sum.
// Reverse KL: pass 1 keeps DivSum states (k = sum q*delta online, relative to the argmax), merged like the
// softmax states; pass 2 writes the gradient. JSD: pass 1 also finds t_ref (the teacher logit at the student's
// argmax: a block max over the threads holding the row's max); pass 2 writes the gradient without its k term,
// kd_coef*w*q into t (scratch) and block-sums q*delta and the p terms; pass 3 subtracts k*t.
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

// Every thread gets the block's merge of its threads' states (WarpMerge within each warp, then across the
// warps; `empty` pads the second round). `scratch` holds kWarps states.
template <class State, State (*WarpMerge)(State, float)>
__device__ State block_merge_states(State x, float scale, State* scratch, State empty) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = WarpMerge(x, scale);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kWarps ? scratch[lane] : empty;
  x = WarpMerge(x, scale);
  __syncthreads();  // scratch may be reused right after
  return x;
}

__device__ OnlineSum block_merge(OnlineSum x, float scale, OnlineSum* scratch) {
  return block_merge_states<OnlineSum, warp_merge>(x, scale, scratch, vocab_kd::online_empty());
}

__device__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kWarps ? scratch[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  __syncthreads();  // scratch may be reused right after
  return x;
}

__device__ vocab_kd::DivSum warp_merge_div(vocab_kd::DivSum x, float inv_t) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const vocab_kd::DivSum other{__shfl_xor_sync(kFullMask, x.max, offset), __shfl_xor_sync(kFullMask, x.sum, offset),
                                 __shfl_xor_sync(kFullMask, x.acc, offset),
                                 __shfl_xor_sync(kFullMask, x.t_ref, offset)};
    x = vocab_kd::div_merge(x, other, inv_t);
  }
  return x;
}

// Every thread gets the merged reverse-KL state of the block. `scratch` holds kWarps states.
__device__ vocab_kd::DivSum block_merge_div(vocab_kd::DivSum x, float inv_t, vocab_kd::DivSum* scratch) {
  return block_merge_states<vocab_kd::DivSum, warp_merge_div>(x, inv_t, scratch, vocab_kd::div_empty());
}

// Largest x over the block (-inf if none), for every thread.
__device__ float block_max(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float neg_inf = __int_as_float(0xff800000);
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kWarps ? scratch[lane] : neg_inf;
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  __syncthreads();
  return x;
}

// Min 4 blocks per SM (at most 64 registers): without it ptxas spilled 12 bytes on sm_80 under --use_fast_math.
__global__ void __launch_bounds__(kThreads, 4)
vocab_kd_rows_kernel(float* __restrict__ s_all, float* __restrict__ t_all, const int64_t* __restrict__ labels,
                     const float* __restrict__ kd_coef, const float* __restrict__ mlm_coef,
                     float* __restrict__ kd_row, float* __restrict__ mlm_row, int64_t vocab, int64_t ld,
                     float temperature, int kind, float beta) {
  __shared__ OnlineSum scratch[kWarps];
  __shared__ vocab_kd::DivSum div_scratch[kWarps];
  __shared__ float sum_scratch[kWarps];
  const int64_t row = blockIdx.x;
  float* s = s_all + row * ld;
  float* t = t_all + row * ld;
  const int64_t label = labels[row];
  const bool has_label = label >= 0;
  const float inv_t = 1.0f / temperature;
  const bool raw_softmax = has_label && temperature != 1.0f;
  const bool reverse = kind == vocab_kd::kReverseKL, jsd = kind == vocab_kd::kJSD;

  OnlineSum a = vocab_kd::online_empty(), b = vocab_kd::online_empty(), raw = vocab_kd::online_empty();
  vocab_kd::DivSum a_div = vocab_kd::div_empty();
  float t_ref = __int_as_float(0xff800000);
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float sv = s[v], tv = t[v];
    if (reverse) {
      a_div = vocab_kd::div_add(a_div, sv, tv, inv_t);
    } else {
      if (jsd && sv > a.max) t_ref = tv;
      a = vocab_kd::online_add(a, sv, inv_t);
    }
    b = vocab_kd::online_add(b, tv, inv_t);
    if (raw_softmax) raw = vocab_kd::online_add(raw, sv, 1.0f);
  }
  if (reverse) {
    a_div = block_merge_div(a_div, inv_t, div_scratch);
    a = {a_div.max, a_div.sum};
    t_ref = a_div.t_ref;
  } else {
    const float local_max = a.max;
    a = block_merge(a, inv_t, scratch);
    if (jsd) t_ref = block_max(local_max == a.max ? t_ref : __int_as_float(0xff800000), sum_scratch);
  }
  b = block_merge(b, inv_t, scratch);
  if (raw_softmax) raw = block_merge(raw, 1.0f, scratch);

  const RowStats st = vocab_kd::row_stats(a, b, raw, temperature, has_label, kd_coef[row], mlm_coef[row], kind, beta,
                                    t_ref);
  const float s_label = has_label ? s[label] : 0.0f;  // read before the last pass overwrites it
  __syncthreads();

  float kd = 0.0f;
  if (reverse) {
    const float k = a_div.acc / a_div.sum;
    kd = vocab_kd::div_finish(st, k, 0.0f).kd;
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const float sv = s[v], tv = t[v];
      s[v] = vocab_kd::reverse_kl_grad(sv, tv, st, k);
    }
    __syncthreads();  // the last pass's writes before the label fix
  } else if (jsd) {
    float sum_q_delta = 0.0f, sum_p_term = 0.0f;
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const float sv = s[v], tv = t[v];
      const vocab_kd::JsdElement e = vocab_kd::jsd_element(sv, tv, st);
      s[v] = e.grad;
      t[v] = e.q_coef;
      sum_q_delta += e.q_delta;
      sum_p_term += e.p_term;
    }
    sum_q_delta = block_sum(sum_q_delta, sum_scratch);
    sum_p_term = block_sum(sum_p_term, sum_scratch);
    const vocab_kd::DivTotals totals = vocab_kd::div_finish(st, sum_q_delta, sum_p_term);
    kd = totals.kd;
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) s[v] -= totals.k * t[v];  // each thread its own v
    __syncthreads();  // the last pass's writes before the label fix
  } else {
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const vocab_kd::ElementOut out = vocab_kd::element_grad(s[v], t[v], st);
      s[v] = out.grad;
      kd += out.kd_term;
    }
    kd = block_sum(kd, sum_scratch);  // its __syncthreads also orders pass 2's writes before the label fix
  }
  if (threadIdx.x == 0) {
    if (has_label) s[label] -= st.mlm_coef;
    kd_row[row] = kd;
    mlm_row[row] = has_label ? vocab_kd::mlm_loss(st, s_label) : 0.0f;
  }
}

}  // namespace

const char* vocab_kd_rows(float* s, float* t, const int64_t* labels, const float* kd_coef,
                          const float* mlm_coef, float* kd_row, float* mlm_row, int64_t rows, int64_t vocab,
                          int64_t ld, float temperature, int kind, float beta, std::uintptr_t stream) {
  if (rows == 0) return nullptr;
  cudaGetLastError();  // clear an earlier, unrelated error
  vocab_kd_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row, vocab, ld, temperature, kind, beta);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace kdfast::cuda
