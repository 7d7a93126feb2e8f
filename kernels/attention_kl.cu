// CUDA kernels of the two-operand attention KL (FlashAttention-2 style, fp32 accumulation).
//
// A block of 256 threads owns a 64 x 64 tile of scores: thread (group g = tid / 16, lane c = tid % 16)
// holds rows g + 16v and keys c + 16u (v, u < 4) of both the student and the teacher tile, so the 16
// threads that share a row are 16 consecutive lanes of one warp.
//   forward: grid (query tiles, B * heads). Each thread keeps an online KlRow per row over its keys of
//            every key tile; the 16 lanes merge their states with shuffles; lse_s, lse_t, KL stored.
//   dq pass: grid (query tiles, B * heads). Recompute the tiles, dS = coef (P_s - P_t) into shared
//            memory, dQ_s += dS K_s (thread: 4 rows x 8 head columns).
//   dk pass: grid (key tiles, B * heads). Same tiles, dK_s += dS^T Q_s (thread: 4 keys x 8 columns);
//            for relations (k = q) it adds to what the dq pass wrote: same stream, so no atomics and
//            bitwise-reproducible gradients.
// All arithmetic on rows is the shared code of csrc/attention_kl_math.h.
#include <cuda_runtime.h>

#include "attention_kl.cuh"
#include "attention_kl_math.h"

namespace kdfast::cuda {
namespace {

using attn::GradView;
using attn::KlRow;
using attn::OperandView;

constexpr int TILE = 64;     // query rows and keys per block tile
constexpr int THREADS = 256;
constexpr int LANES = 16;    // threads sharing a row
constexpr int PER = 4;       // rows (and keys) per thread: TILE / LANES
constexpr int CHUNK = 16;    // head columns (or keys) staged in shared memory at a time
constexpr int MAX_D = 128;
constexpr int COLS = MAX_D / LANES;  // head columns per thread in the gradient passes

struct Problem {
  OperandView q_s, k_s, q_t, k_t;
  const bool* key_mask;
  index_t heads, length;

  __device__ bool valid(index_t b, index_t j) const {
    return j < length && (key_mask == nullptr || key_mask[b * length + j]);
  }
};

struct TileStage {  // shared staging of one CHUNK of head columns of a query and a key tile
  float q[TILE][CHUNK + 1];
  float k[TILE][CHUNK + 1];
};

// out[v][u] = alpha * q(row0 + g + 16v) . k(key0 + c + 16u); rows/keys beyond L read as 0.
__device__ void score_tile(const OperandView& q, const OperandView& k, index_t b, index_t h, index_t length,
                           index_t row0, index_t key0, TileStage& stage, float out[PER][PER]) {
  const int g = threadIdx.x / LANES, c = threadIdx.x % LANES;
#pragma unroll
  for (int v = 0; v < PER; ++v)
#pragma unroll
    for (int u = 0; u < PER; ++u) out[v][u] = 0.0f;
  for (int col0 = 0; col0 < q.d; col0 += CHUNK) {
    __syncthreads();
    for (int e = threadIdx.x; e < TILE * CHUNK; e += THREADS) {
      int r = e / CHUNK, col = col0 + e % CHUNK;
      bool in_d = col < q.d;
      stage.q[r][e % CHUNK] = in_d && row0 + r < length ? q.load(b, h, row0 + r, col) : 0.0f;
      stage.k[r][e % CHUNK] = in_d && key0 + r < length ? k.load(b, h, key0 + r, col) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
      float qv[PER], kv[PER];
#pragma unroll
      for (int v = 0; v < PER; ++v) qv[v] = stage.q[g + LANES * v][i];
#pragma unroll
      for (int u = 0; u < PER; ++u) kv[u] = stage.k[c + LANES * u][i];
#pragma unroll
      for (int v = 0; v < PER; ++v)
#pragma unroll
        for (int u = 0; u < PER; ++u) out[v][u] = fmaf(qv[v], kv[u], out[v][u]);
    }
  }
  const float alpha = rsqrtf(static_cast<float>(q.d));
#pragma unroll
  for (int v = 0; v < PER; ++v)
#pragma unroll
    for (int u = 0; u < PER; ++u) out[v][u] *= alpha;
}

__device__ KlRow shuffle_xor(const KlRow& row, int mask) {
  const unsigned all = 0xffffffffu;
  return KlRow{__shfl_xor_sync(all, row.m_s, mask), __shfl_xor_sync(all, row.l_s, mask),
               __shfl_xor_sync(all, row.m_t, mask), __shfl_xor_sync(all, row.l_t, mask),
               __shfl_xor_sync(all, row.acc, mask)};
}

__global__ void __launch_bounds__(THREADS) forward_kernel(Problem p, float* kl_rows, float* lse_s, float* lse_t) {
  __shared__ TileStage stage;
  const index_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, row0 = static_cast<index_t>(blockIdx.x) * TILE;
  const int g = threadIdx.x / LANES, c = threadIdx.x % LANES;
  KlRow rows[PER];
#pragma unroll
  for (int v = 0; v < PER; ++v) rows[v] = attn::kl_row_empty();

  for (index_t key0 = 0; key0 < p.length; key0 += TILE) {
    float s[PER][PER], t[PER][PER];
    score_tile(p.q_s, p.k_s, b, h, p.length, row0, key0, stage, s);
    score_tile(p.q_t, p.k_t, b, h, p.length, row0, key0, stage, t);
    bool key_ok[PER];
#pragma unroll
    for (int u = 0; u < PER; ++u) key_ok[u] = p.valid(b, key0 + c + LANES * u);
#pragma unroll
    for (int v = 0; v < PER; ++v) {
      float max_s = -INFINITY, max_t = -INFINITY;
#pragma unroll
      for (int u = 0; u < PER; ++u)
        if (key_ok[u]) max_s = fmaxf(max_s, s[v][u]), max_t = fmaxf(max_t, t[v][u]);
      if (max_s == -INFINITY) continue;  // none of this thread's keys in the tile is valid
      attn::kl_row_raise(rows[v], max_s, max_t);
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        if (!key_ok[u]) continue;
        float e_s, e_t, e_gap;
        attn::kl_key_terms(s[v][u], t[v][u], rows[v].m_s, rows[v].m_t, e_s, e_t, e_gap);
        attn::kl_row_add(rows[v], e_s, e_t, e_gap);
      }
    }
  }
#pragma unroll
  for (int v = 0; v < PER; ++v)
#pragma unroll
    for (int mask = LANES / 2; mask > 0; mask /= 2) rows[v] = attn::kl_row_merge(rows[v], shuffle_xor(rows[v], mask));
  if (c != 0) return;
#pragma unroll
  for (int v = 0; v < PER; ++v) {
    index_t row = row0 + g + LANES * v;
    if (row >= p.length) continue;
    index_t at = bh * p.length + row;
    if (p.valid(b, row)) {
      kl_rows[at] = attn::kl_row_finish(rows[v], lse_s[at], lse_t[at]);
    } else {
      kl_rows[at] = lse_s[at] = lse_t[at] = 0.0f;
    }
  }
}

struct GradStage {
  TileStage scores;
  float ds[TILE][TILE + 1];           // dS of the tile, [query row][key]
  float operand[CHUNK][MAX_D + 1];    // CHUNK rows of K_s (dq pass) or Q_s (dk pass)
};

// dS of the (row0, key0) tile into stage.ds; rows and keys beyond L or masked give 0.
__device__ void grad_tile(const Problem& p, index_t b, index_t h, index_t row0, index_t key0, const float* lse_s,
                          const float* lse_t, float coef, GradStage& stage) {
  const int g = threadIdx.x / LANES, c = threadIdx.x % LANES;
  float s[PER][PER], t[PER][PER];
  score_tile(p.q_s, p.k_s, b, h, p.length, row0, key0, stage.scores, s);
  score_tile(p.q_t, p.k_t, b, h, p.length, row0, key0, stage.scores, t);
  const index_t bh_base = (b * p.heads + h) * p.length;
#pragma unroll
  for (int v = 0; v < PER; ++v) {
    index_t row = row0 + g + LANES * v;
    bool row_ok = p.valid(b, row);
    float ls = row_ok ? lse_s[bh_base + row] : 0.0f, lt = row_ok ? lse_t[bh_base + row] : 0.0f;
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      bool ok = row_ok && p.valid(b, key0 + c + LANES * u);
      stage.ds[g + LANES * v][c + LANES * u] = ok ? attn::kl_score_grad(s[v][u], t[v][u], ls, lt, coef) : 0.0f;
    }
  }
}

// Stage rows first .. first + CHUNK of x (all head columns) into stage.operand (0 beyond L and d).
__device__ void stage_rows(const OperandView& x, index_t b, index_t h, index_t length, index_t first, GradStage& stage) {
  __syncthreads();
  for (int e = threadIdx.x; e < CHUNK * MAX_D; e += THREADS) {
    int r = e / MAX_D, col = e % MAX_D;
    stage.operand[r][col] = col < x.d && first + r < length ? x.load(b, h, first + r, col) : 0.0f;
  }
  __syncthreads();
}

// Write alpha * acc (rows owner(v) of this block, columns c + 16w) to out; invalid rows get 0.
__device__ void write_rows(const Problem& p, index_t b, index_t h, index_t first, const float acc[PER][COLS],
                           const GradView& out, bool accumulate) {
  const int g = threadIdx.x / LANES, c = threadIdx.x % LANES;
  const float alpha = rsqrtf(static_cast<float>(p.q_s.d));
#pragma unroll
  for (int v = 0; v < PER; ++v) {
    index_t row = first + g + LANES * v;
    if (row >= p.length) continue;
    bool ok = p.valid(b, row);
    float* dst = out.row(b, h, row);
#pragma unroll
    for (int w = 0; w < COLS; ++w) {
      int col = c + LANES * w;
      if (col >= p.q_s.d) continue;
      float value = ok ? alpha * acc[v][w] : 0.0f;
      dst[col] = accumulate ? dst[col] + value : value;
    }
  }
}

__global__ void __launch_bounds__(THREADS) dq_kernel(Problem p, const float* lse_s, const float* lse_t, float coef,
                                                     GradView dq) {
  __shared__ GradStage stage;
  const index_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, row0 = static_cast<index_t>(blockIdx.x) * TILE;
  const int g = threadIdx.x / LANES, c = threadIdx.x % LANES;
  float acc[PER][COLS] = {};
  for (index_t key0 = 0; key0 < p.length; key0 += TILE) {
    grad_tile(p, b, h, row0, key0, lse_s, lse_t, coef, stage);
    for (int k0 = 0; k0 < TILE; k0 += CHUNK) {
      stage_rows(p.k_s, b, h, p.length, key0 + k0, stage);
#pragma unroll 4
      for (int j = 0; j < CHUNK; ++j) {
        float ds[PER];
#pragma unroll
        for (int v = 0; v < PER; ++v) ds[v] = stage.ds[g + LANES * v][k0 + j];
#pragma unroll
        for (int w = 0; w < COLS; ++w) {
          float kv = stage.operand[j][c + LANES * w];
#pragma unroll
          for (int v = 0; v < PER; ++v) acc[v][w] = fmaf(ds[v], kv, acc[v][w]);
        }
      }
    }
  }
  write_rows(p, b, h, row0, acc, dq, false);
}

__global__ void __launch_bounds__(THREADS) dk_kernel(Problem p, const float* lse_s, const float* lse_t, float coef,
                                                     GradView dk, bool accumulate) {
  __shared__ GradStage stage;
  const index_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, key0 = static_cast<index_t>(blockIdx.x) * TILE;
  const int g = threadIdx.x / LANES, c = threadIdx.x % LANES;
  float acc[PER][COLS] = {};  // keys key0 + g + 16v
  for (index_t row0 = 0; row0 < p.length; row0 += TILE) {
    grad_tile(p, b, h, row0, key0, lse_s, lse_t, coef, stage);
    for (int r0 = 0; r0 < TILE; r0 += CHUNK) {
      stage_rows(p.q_s, b, h, p.length, row0 + r0, stage);
#pragma unroll 4
      for (int i = 0; i < CHUNK; ++i) {
        float ds[PER];
#pragma unroll
        for (int v = 0; v < PER; ++v) ds[v] = stage.ds[r0 + i][g + LANES * v];
#pragma unroll
        for (int w = 0; w < COLS; ++w) {
          float qv = stage.operand[i][c + LANES * w];
#pragma unroll
          for (int v = 0; v < PER; ++v) acc[v][w] = fmaf(ds[v], qv, acc[v][w]);
        }
      }
    }
  }
  write_rows(p, b, h, key0, acc, dk, accumulate);
}

const char* launched() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

dim3 grid(int64_t batch, int64_t heads, int64_t length) {
  return dim3(static_cast<unsigned>((length + TILE - 1) / TILE), static_cast<unsigned>(batch * heads));
}

}  // namespace

const char* attention_kl_forward(OperandView q_s, OperandView k_s, OperandView q_t, OperandView k_t,
                                 const bool* key_mask, int64_t batch, int64_t heads, int64_t length, float* kl_rows,
                                 float* lse_s, float* lse_t, uintptr_t stream) {
  Problem p{q_s, k_s, q_t, k_t, key_mask, heads, length};
  forward_kernel<<<grid(batch, heads, length), THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      p, kl_rows, lse_s, lse_t);
  return launched();
}

const char* attention_kl_backward(OperandView q_s, OperandView k_s, OperandView q_t, OperandView k_t, bool same_qk,
                                  const bool* key_mask, int64_t batch, int64_t heads, int64_t length,
                                  const float* lse_s, const float* lse_t, float coef, GradView dq, GradView dk,
                                  uintptr_t stream) {
  Problem p{q_s, k_s, q_t, k_t, key_mask, heads, length};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dq_kernel<<<grid(batch, heads, length), THREADS, 0, s>>>(p, lse_s, lse_t, coef, dq);
  if (const char* err = launched()) return err;
  dk_kernel<<<grid(batch, heads, length), THREADS, 0, s>>>(p, lse_s, lse_t, coef, dk, same_qk);
  return launched();
}

}  // namespace kdfast::cuda
