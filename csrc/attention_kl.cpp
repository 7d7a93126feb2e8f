// CPU kernel of the two-operand attention KL (MiniLM attention KL; MiniLMv2 relation KL is q = k).
//
// Work unit: a tile of TILE query rows of one (batch, head) against all its valid keys, so the
// scratch memory is O(TILE * L) per thread. Masked keys and masked query rows are compacted
// away before any arithmetic (excluded rows get KL = 0 and zero gradient).
//   forward : OpenMP over (batch, head, query tile). S = a_s Q_s K_s^T and T = a_t Q_t K_t^T tiles
//             from a register-blocked microkernel, then one fused pass per row gives KL, lse_s, lse_t.
//   backward: OpenMP over (batch, head); one thread walks its query tiles in order, recomputes S and T,
//             turns them into dS = coef (P_s - P_t), writes dQ_s = a_s dS K_s for the tile and adds
//             a_s dS^T Q_s into a per-(batch, head) dK_s accumulator. One owner per dK_s and a fixed
//             order: no atomics, bitwise-reproducible gradients, and each score tile is computed
//             twice (forward, backward) instead of three times as a separate key-tile pass needs.
// The microkernel beats per-tile torch/MKL matmuls here (no Python loop, no [tile, L] tensors,
// packing fused with the bf16/fp16 -> fp32 conversion).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "attention_kl_args.h"
#include "attention_kl_math.h"
#include "ops.h"

namespace kdfast {
namespace {

namespace py = pybind11;
using attn::KlRow;

constexpr int TILE = 64;  // query rows per work unit
constexpr int MR = 8;     // microkernel rows
constexpr int NR = 16;    // microkernel columns (one 16-float vector)

#define KDFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

index_t round_up(index_t n, index_t m) { return (n + m - 1) / m * m; }

// ---------------------------------------------------------------- microkernel
typedef float vec16 __attribute__((vector_size(64)));

__attribute__((always_inline)) inline void load16(vec16& v, const float* p) { std::memcpy(&v, p, sizeof(v)); }

// C[m, n] (+)= scale * sum_k A(m, k) B[k, n] with A(m, k) = a[m * a_rs + k * a_cs], B and C row-major.
// M is a multiple of MR, N of NR; A must be readable on all M rows (zero-padded by the caller).
KDFAST_CLONES void gemm(index_t M, index_t N, index_t K, const float* a, index_t a_rs, index_t a_cs,
                        const float* b, index_t b_rs, float* c, index_t c_rs, float scale, bool accumulate) {
  for (index_t j0 = 0; j0 < N; j0 += NR) {
    for (index_t i0 = 0; i0 < M; i0 += MR) {
      vec16 acc[MR] = {};
      const float* a_blk = a + i0 * a_rs;
      for (index_t k = 0; k < K; ++k) {
        vec16 bk;
        load16(bk, b + k * b_rs + j0);
        const float* a_k = a_blk + k * a_cs;
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) acc[r] += a_k[r * a_rs] * bk;
      }
      for (int r = 0; r < MR; ++r) {
        float* c_row = c + (i0 + r) * c_rs + j0;
        vec16 out = acc[r] * scale;
        if (accumulate) {
          vec16 old;
          load16(old, c_row);
          out += old;
        }
        std::memcpy(c_row, &out, sizeof(out));
      }
    }
  }
}

// ---------------------------------------------------------------- packing
using attn::GradView;
using attn::OperandArgs;
using attn::OperandView;
using attn::GradArgs;

// rows[r] of (b, h) as fp32 into dst[r * ld + c] (c < d), zero beyond d up to ld and for r in [n, rows_padded).
void pack_rows(const OperandView& x, index_t b, index_t h, const index_t* rows, index_t n, index_t rows_padded,
               float* dst, index_t ld) {
  std::fill(dst, dst + rows_padded * ld, 0.0f);
  for (index_t r = 0; r < n; ++r) {
    index_t base = x.offset(b, h, rows[r]);
    for (int c = 0; c < x.d; ++c) dst[r * ld + c] = attn::load_as_float(x.ptr, x.storage, base + c);
  }
}

// The transpose: dst[c * ld + r] for c < d_padded (zero beyond d), r < n (zero up to ld).
void pack_columns(const OperandView& x, index_t b, index_t h, const index_t* rows, index_t n, index_t d_padded,
                  float* dst, index_t ld) {
  std::fill(dst, dst + d_padded * ld, 0.0f);
  for (index_t r = 0; r < n; ++r) {
    index_t base = x.offset(b, h, rows[r]);
    for (int c = 0; c < x.d; ++c) dst[c * ld + r] = attn::load_as_float(x.ptr, x.storage, base + c);
  }
}

// ---------------------------------------------------------------- row math
// KL of one row of n valid keys; writes both log-sum-exps. The whole row is one online block.
KDFAST_CLONES float row_forward(const float* s, const float* t, index_t n, float* lse_s, float* lse_t) {
  float max_s = -INFINITY, max_t = -INFINITY;
#pragma omp simd reduction(max : max_s, max_t)
  for (index_t j = 0; j < n; ++j) {
    max_s = std::max(max_s, s[j]);
    max_t = std::max(max_t, t[j]);
  }
  KlRow row = attn::kl_row_empty();
  attn::kl_row_raise(row, max_s, max_t);
  float sum_s = 0.0f, sum_t = 0.0f, sum_gap = 0.0f;
#pragma omp simd reduction(+ : sum_s, sum_t, sum_gap)
  for (index_t j = 0; j < n; ++j) {
    float e_s, e_t, e_gap;
    attn::kl_key_terms(s[j], t[j], max_s, max_t, e_s, e_t, e_gap);
    sum_s += e_s;
    sum_t += e_t;
    sum_gap += e_gap;
  }
  attn::kl_row_add(row, sum_s, sum_t, sum_gap);
  return attn::kl_row_finish(row, *lse_s, *lse_t);
}

// s[j] <- coef (P_s - P_t) for the n valid keys of one row.
KDFAST_CLONES void row_backward(float* s, const float* t, index_t n, float lse_s, float lse_t, float coef) {
#pragma omp simd
  for (index_t j = 0; j < n; ++j) s[j] = attn::kl_score_grad(s[j], t[j], lse_s, lse_t, coef);
}

// ---------------------------------------------------------------- problem
struct Problem {
  OperandView q_s, k_s, q_t, k_t;
  bool same_qk;            // relation: k is q (gradients sum into one output)
  const bool* key_mask;    // [B, L] contiguous, or null
  index_t batch, heads, length;
  std::vector<std::vector<index_t>> valid;  // per batch row: positions of unmasked tokens

  Problem(const OperandArgs& qs, const OperandArgs& ks, const OperandArgs& qt, const OperandArgs& kt,
          bool same, uintptr_t mask, index_t b, index_t h, index_t l)
      : q_s(attn::operand_view(qs)), k_s(attn::operand_view(ks)), q_t(attn::operand_view(qt)),
        k_t(attn::operand_view(kt)), same_qk(same),
        key_mask(reinterpret_cast<const bool*>(mask)), batch(b), heads(h), length(l), valid(b) {
    for (index_t bi = 0; bi < b; ++bi)
      for (index_t j = 0; j < l; ++j)
        if (key_mask == nullptr || key_mask[bi * l + j]) valid[bi].push_back(j);
  }
  index_t d_s_padded() const { return round_up(q_s.d, NR); }
  index_t d_t_padded() const { return round_up(q_t.d, NR); }
  index_t keys_padded(index_t b) const { return round_up(static_cast<index_t>(valid[b].size()), NR); }
  index_t tiles(index_t b) const { return (static_cast<index_t>(valid[b].size()) + TILE - 1) / TILE; }
};

// Thread-local scratch of one (batch, head): packed keys and one query tile of each side.
struct Scratch {
  std::vector<float> kt_s, kt_t;   // K^T packed [d_padded, keys_padded]
  std::vector<float> k_s;          // K_s packed [keys_padded, d_s_padded] (backward)
  std::vector<float> qs, qt;       // query tile [TILE, d_padded]
  std::vector<float> s, t;         // score tiles [TILE, keys_padded]
  std::vector<float> dq, dk;       // dQ_s tile [TILE, d_s_padded]; dK_s [keys_padded, d_s_padded]

  void reserve(const Problem& p, index_t keys_padded, bool backward) {
    index_t ds = p.d_s_padded(), dt = p.d_t_padded();
    kt_s.resize(ds * keys_padded);
    kt_t.resize(dt * keys_padded);
    qs.resize(TILE * ds);
    qt.resize(TILE * dt);
    s.resize(TILE * keys_padded);
    t.resize(TILE * keys_padded);
    if (backward) {
      k_s.resize(keys_padded * ds);
      dq.resize(TILE * ds);
      dk.resize(keys_padded * ds);
    }
  }

  // Pack the keys of (b, h) for the score products.
  void pack_keys(const Problem& p, index_t b, index_t h, bool backward) {
    const std::vector<index_t>& keys = p.valid[b];
    index_t n = keys.size(), np = p.keys_padded(b);
    pack_columns(p.k_s, b, h, keys.data(), n, p.d_s_padded(), kt_s.data(), np);
    pack_columns(p.k_t, b, h, keys.data(), n, p.d_t_padded(), kt_t.data(), np);
    if (backward) pack_rows(p.k_s, b, h, keys.data(), n, np, k_s.data(), p.d_s_padded());
  }

  // Score tiles S and T for query tile `tile` of (b, h); returns its number of rows.
  index_t scores(const Problem& p, index_t b, index_t h, index_t tile) {
    const std::vector<index_t>& rows = p.valid[b];
    index_t first = tile * TILE, n = std::min<index_t>(TILE, rows.size() - first);
    index_t np = p.keys_padded(b), ds = p.d_s_padded(), dt = p.d_t_padded();
    pack_rows(p.q_s, b, h, rows.data() + first, n, TILE, qs.data(), ds);
    pack_rows(p.q_t, b, h, rows.data() + first, n, TILE, qt.data(), dt);
    gemm(TILE, np, p.q_s.d, qs.data(), ds, 1, kt_s.data(), np, s.data(), np, 1.0f / std::sqrt(float(p.q_s.d)), false);
    gemm(TILE, np, p.q_t.d, qt.data(), dt, 1, kt_t.data(), np, t.data(), np, 1.0f / std::sqrt(float(p.q_t.d)), false);
    return n;
  }
};

// Zero the outputs of masked rows of (b, h): row_out has `stride` between rows and `width` values.
void zero_masked_rows(const Problem& p, index_t b, float* base, index_t stride, index_t width) {
  if (p.key_mask == nullptr) return;
  for (index_t j = 0; j < p.length; ++j)
    if (!p.key_mask[b * p.length + j]) std::fill(base + j * stride, base + j * stride + width, 0.0f);
}

// kl_rows, lse_s, lse_t: fp32 [B, heads, L] contiguous.
void forward(const OperandArgs& qs, const OperandArgs& ks, const OperandArgs& qt, const OperandArgs& kt,
             bool same_qk, uintptr_t mask, index_t batch, index_t heads, index_t length,
             uintptr_t kl_rows, uintptr_t lse_s, uintptr_t lse_t) {
  py::gil_scoped_release release;
  Problem p(qs, ks, qt, kt, same_qk, mask, batch, heads, length);
  float* kl_out = reinterpret_cast<float*>(kl_rows);
  float* lse_s_out = reinterpret_cast<float*>(lse_s);
  float* lse_t_out = reinterpret_cast<float*>(lse_t);

  std::fill(kl_out, kl_out + batch * heads * length, 0.0f);  // masked rows stay 0
  std::fill(lse_s_out, lse_s_out + batch * heads * length, 0.0f);
  std::fill(lse_t_out, lse_t_out + batch * heads * length, 0.0f);
  std::vector<std::pair<index_t, index_t>> units;  // (b * heads + h, tile), tiles of a head adjacent
  for (index_t bh = 0; bh < batch * heads; ++bh)
    for (index_t tile = 0; tile < p.tiles(bh / heads); ++tile) units.emplace_back(bh, tile);

#pragma omp parallel
  {
    Scratch scratch;
    index_t packed = -1;  // the (b, h) whose keys are packed in this thread's scratch
#pragma omp for schedule(static)
    for (index_t u = 0; u < static_cast<index_t>(units.size()); ++u) {
      index_t bh = units[u].first, tile = units[u].second, b = bh / heads, h = bh % heads;
      index_t np = p.keys_padded(b), n_keys = p.valid[b].size();
      if (packed != bh) {
        scratch.reserve(p, np, false);
        scratch.pack_keys(p, b, h, false);
        packed = bh;
      }
      index_t rows = scratch.scores(p, b, h, tile);
      for (index_t r = 0; r < rows; ++r) {
        index_t out = bh * length + p.valid[b][tile * TILE + r];
        kl_out[out] = row_forward(scratch.s.data() + r * np, scratch.t.data() + r * np, n_keys,
                                  lse_s_out + out, lse_t_out + out);
      }
    }
  }
}

// dq, dk: fp32 outputs (the same buffer when same_qk); coef multiplies every dS.
void backward(const OperandArgs& qs, const OperandArgs& ks, const OperandArgs& qt, const OperandArgs& kt,
              bool same_qk, uintptr_t mask, index_t batch, index_t heads, index_t length,
              uintptr_t lse_s, uintptr_t lse_t, float coef, const GradArgs& dq_args, const GradArgs& dk_args) {
  py::gil_scoped_release release;
  Problem p(qs, ks, qt, kt, same_qk, mask, batch, heads, length);
  const float* lse_s_in = reinterpret_cast<const float*>(lse_s);
  const float* lse_t_in = reinterpret_cast<const float*>(lse_t);
  GradView dq = attn::grad_view(dq_args), dk = attn::grad_view(dk_args);
  const int d = p.q_s.d;
  const float alpha_s = 1.0f / std::sqrt(float(d));

#pragma omp parallel
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (index_t bh = 0; bh < batch * heads; ++bh) {
      index_t b = bh / heads, h = bh % heads;
      const std::vector<index_t>& valid = p.valid[b];
      index_t np = p.keys_padded(b), n_keys = valid.size(), ds = p.d_s_padded();
      zero_masked_rows(p, b, dk.row(b, h, 0), dk.sl, d);
      if (!same_qk) zero_masked_rows(p, b, dq.row(b, h, 0), dq.sl, d);
      if (n_keys == 0) continue;
      scratch.reserve(p, np, true);
      scratch.pack_keys(p, b, h, true);
      std::fill(scratch.dk.begin(), scratch.dk.begin() + np * ds, 0.0f);
      for (index_t tile = 0; tile < p.tiles(b); ++tile) {
        index_t rows = scratch.scores(p, b, h, tile);
        for (index_t r = 0; r < rows; ++r) {
          index_t at = bh * length + valid[tile * TILE + r];
          row_backward(scratch.s.data() + r * np, scratch.t.data() + r * np, n_keys, lse_s_in[at], lse_t_in[at],
                       coef);
        }
        // dQ_s tile = a_s dS K_s;  dK_s += a_s dS^T Q_s.
        gemm(TILE, ds, n_keys, scratch.s.data(), np, 1, scratch.k_s.data(), ds, scratch.dq.data(), ds, alpha_s, false);
        gemm(np, ds, rows, scratch.s.data(), 1, np, scratch.qs.data(), ds, scratch.dk.data(), ds, alpha_s, true);
        for (index_t r = 0; r < rows; ++r) {
          index_t pos = tile * TILE + r;
          const float* src = scratch.dq.data() + r * ds;
          if (same_qk) {  // relation: the query row is also key `pos`
            float* acc = scratch.dk.data() + pos * ds;
            for (int c = 0; c < d; ++c) acc[c] += src[c];
          } else {
            std::copy(src, src + d, dq.row(b, h, valid[pos]));
          }
        }
      }
      for (index_t j = 0; j < n_keys; ++j)
        std::copy(scratch.dk.data() + j * ds, scratch.dk.data() + j * ds + d, dk.row(b, h, valid[j]));
    }
  }
}

}  // namespace

void register_attention_kl(pybind11::module_& m) {
  m.def("attention_kl_forward", &forward,
        "KL rows and both log-sum-exps [B, heads, L] (fp32) from Q/K operands "
        "(ptr, storage, d, stride_b, stride_h, stride_l)",
        py::arg("q_s"), py::arg("k_s"), py::arg("q_t"), py::arg("k_t"), py::arg("same_qk"), py::arg("key_mask"),
        py::arg("batch"), py::arg("heads"), py::arg("length"), py::arg("kl_rows"), py::arg("lse_s"),
        py::arg("lse_t"));
  m.def("attention_kl_backward", &backward,
        "fp32 gradients of the summed KL rows (times coef) into dq and dk (ptr, stride_b, stride_h, stride_l)",
        py::arg("q_s"), py::arg("k_s"), py::arg("q_t"), py::arg("k_t"), py::arg("same_qk"), py::arg("key_mask"),
        py::arg("batch"), py::arg("heads"), py::arg("length"), py::arg("lse_s"), py::arg("lse_t"),
        py::arg("coef"), py::arg("dq"), py::arg("dk"));
}

}  // namespace kdfast
