// CPU kernel of the TinyBERT attention-score MSE by Gram algebra (see attention_mse_math.h).
//
// One OpenMP task per (batch, head). Per head it loads X = [a_s Q_s | -a_t Q_t] and
// Y = [K_s | K_t] (masked key rows 0) once into float64 panels, forms the upper triangles of
// GQ = X^T X and GK = Y^T Y, reduces E = <GQ, GK>, and, when gradients are wanted, writes
// dQ_s = g_q X GK[:, :d_s] and dK_s = g_k Y GQ[:, :d_s] straight to fp32. Memory is O(L n + n^2)
// per thread; no L x L tensor exists. All products and sums are float64.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "attention_mse_math.h"
#include "ops.h"

namespace kdfast {
namespace {

namespace py = pybind11;

constexpr index_t kRows = 6;    // register tile: rows of the output
constexpr index_t kCols = 16;   // register tile: columns (two 8-wide float64 vectors)
using vec8d = double __attribute__((vector_size(64), aligned(8)));

// c[0:6, 0:16] = sum_k A(i, k) B(k, j) with A(i, k) = a[i * a_row + k * a_step], B(k, j) = b[k * ldb + j].
// Twelve 8-wide accumulators stay in registers; every loaded B row feeds six FMAs per vector.
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
void tile_6x16(index_t depth, const double* a, index_t a_row, index_t a_step, const double* b, index_t ldb,
               double* c, index_t ldc) {
  vec8d acc[kRows][2] = {};
  for (index_t k = 0; k < depth; ++k) {
    vec8d b0, b1;
    std::memcpy(&b0, b + k * ldb, sizeof(vec8d));
    std::memcpy(&b1, b + k * ldb + 8, sizeof(vec8d));
    for (index_t r = 0; r < kRows; ++r) {
      const double ar = a[r * a_row + k * a_step];
      acc[r][0] += ar * b0;
      acc[r][1] += ar * b1;
    }
  }
  for (index_t r = 0; r < kRows; ++r) {
    std::memcpy(c + r * ldc, &acc[r][0], sizeof(vec8d));
    std::memcpy(c + r * ldc + 8, &acc[r][1], sizeof(vec8d));
  }
}

index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }

struct Problem {
  index_t batch, heads, length, d_s, d_t;
  MseOperand x, y;  // X = [a_s Q_s | -a_t Q_t], Y = [K_s | K_t] with the key mask
  double grad_scale_q, grad_scale_k;
  double* head_energy;        // [B * h]
  float* dq_s;                // [B, h, L, d_s] contiguous, or nullptr (no gradients)
  float* dk_s;
};

// Per-thread float64 panels, padded so every register tile reads inside them.
struct Panels {
  index_t rows, ld, gram_rows;
  std::vector<double> x, y, gq, gk, tile;
  Panels(index_t length, index_t n)
      : rows(round_up(length, kRows)), ld(round_up(n, kCols)), gram_rows(round_up(ld, kRows)),
        x(rows * ld + kRows), y(rows * ld + kRows), gq(gram_rows * ld), gk(gram_rows * ld), tile(kRows * kCols) {}
};

// The operand of head (b, h) as a float64 panel; padding rows and columns are 0.
void load_panel(const MseOperand& operand, index_t b, index_t h, const Problem& p, std::vector<double>& panel,
                index_t ld) {
  std::fill(panel.begin(), panel.end(), 0.0);
  for (index_t l = 0; l < p.length; ++l)
    for (index_t c = 0; c < p.d_s + p.d_t; ++c)
      panel[l * ld + c] = mse_operand_at(operand, b, h, l, c, p.length, p.d_s, p.d_t);
}

// Upper triangle (in 6x16 tiles, so j >= i is always covered) of G = P^T P for a panel P.
void gram_upper(const std::vector<double>& panel, index_t rows, index_t ld, std::vector<double>& gram) {
  for (index_t i0 = 0; i0 < ld; i0 += kRows)
    for (index_t j0 = i0 / kCols * kCols; j0 < ld; j0 += kCols)
      tile_6x16(rows, panel.data() + i0, 1, ld, panel.data() + j0, ld, gram.data() + i0 * ld + j0, ld);
}

void mirror_lower(std::vector<double>& gram, index_t n, index_t ld) {
  for (index_t i = 1; i < n; ++i)
    for (index_t j = 0; j < i; ++j) gram[i * ld + j] = gram[j * ld + i];
}

// out[l, j] = scale * (P G)[l, j] for j < d_s, l < L: the gradient of one student input.
void panel_times_gram(Panels& w, const std::vector<double>& panel, const std::vector<double>& gram,
                      index_t n, index_t length, index_t d_s, double scale, float* out) {
  std::vector<double>& tile = w.tile;
  for (index_t l0 = 0; l0 < length; l0 += kRows)
    for (index_t j0 = 0; j0 < d_s; j0 += kCols) {
      tile_6x16(n, panel.data() + l0 * w.ld, w.ld, 1, gram.data() + j0, w.ld, tile.data(), kCols);
      for (index_t r = 0; r < std::min(kRows, length - l0); ++r)
        for (index_t j = j0; j < std::min(j0 + kCols, d_s); ++j)
          out[(l0 + r) * d_s + j] = static_cast<float>(scale * tile[r * kCols + (j - j0)]);
    }
}

void one_head(const Problem& p, index_t bh, Panels& w) {
  const index_t b = bh / p.heads, h = bh % p.heads, n = p.d_s + p.d_t;
  load_panel(p.x, b, h, p, w.x, w.ld);
  load_panel(p.y, b, h, p, w.y, w.ld);
  gram_upper(w.x, w.rows, w.ld, w.gq);
  gram_upper(w.y, w.rows, w.ld, w.gk);
  double energy = 0.0;
  for (index_t i = 0; i < n; ++i)
    for (index_t j = i; j < n; ++j) energy += mse_gram_pair(w.gq[i * w.ld + j], w.gk[i * w.ld + j], j != i);
  p.head_energy[bh] = energy;
  if (p.dq_s == nullptr) return;
  mirror_lower(w.gq, n, w.ld);
  mirror_lower(w.gk, n, w.ld);
  const index_t offset = bh * p.length * p.d_s;
  panel_times_gram(w, w.x, w.gk, n, p.length, p.d_s, p.grad_scale_q, p.dq_s + offset);
  panel_times_gram(w, w.y, w.gq, n, p.length, p.d_s, p.grad_scale_k, p.dk_s + offset);
}

void attention_mse_forward(std::uintptr_t q_s, std::vector<index_t> q_s_stride, std::uintptr_t k_s,
                           std::vector<index_t> k_s_stride, std::uintptr_t q_t, std::vector<index_t> q_t_stride,
                           std::uintptr_t k_t, std::vector<index_t> k_t_stride, std::uintptr_t key_mask,
                           std::vector<index_t> mask_stride, std::vector<index_t> sizes, double alpha_s,
                           double alpha_t, double grad_scale_q, double grad_scale_k, std::uintptr_t head_energy,
                           std::uintptr_t dq_s, std::uintptr_t dk_s) {
  auto operand = [](std::uintptr_t student, const std::vector<index_t>& s_stride, std::uintptr_t teacher,
                    const std::vector<index_t>& t_stride, double s_scale, double t_scale, std::uintptr_t mask,
                    const std::vector<index_t>& mask_stride) {
    return MseOperand{reinterpret_cast<const float*>(student), reinterpret_cast<const float*>(teacher),
                      {s_stride.at(0), s_stride.at(1), s_stride.at(2), s_stride.at(3)},
                      {t_stride.at(0), t_stride.at(1), t_stride.at(2), t_stride.at(3)}, s_scale, t_scale,
                      reinterpret_cast<const uint8_t*>(mask), mask_stride.at(0), mask_stride.at(1)};
  };
  const Problem p{sizes.at(0), sizes.at(1), sizes.at(2), sizes.at(3), sizes.at(4),
                  operand(q_s, q_s_stride, q_t, q_t_stride, alpha_s, -alpha_t, 0, {0, 0}),
                  operand(k_s, k_s_stride, k_t, k_t_stride, 1.0, 1.0, key_mask, mask_stride),
                  grad_scale_q, grad_scale_k, reinterpret_cast<double*>(head_energy),
                  reinterpret_cast<float*>(dq_s), reinterpret_cast<float*>(dk_s)};
  py::gil_scoped_release release;
#pragma omp parallel
  {
    Panels w(p.length, p.d_s + p.d_t);
#pragma omp for schedule(dynamic, 1)  // heads are independent: balance busy cores
    for (index_t bh = 0; bh < p.batch * p.heads; ++bh) one_head(p, bh, w);
  }
}

}  // namespace

void register_attention_mse(pybind11::module_& m) {
  m.def("attention_mse_forward", &attention_mse_forward,
        "TinyBERT score MSE by Gram algebra: per-head energy [B*h] (float64) and, when the gradient "
        "pointers are non-zero, dQ_s and dK_s [B, h, L, d_s] (fp32). Inputs are fp32 with element strides.",
        py::arg("q_s"), py::arg("q_s_stride"), py::arg("k_s"), py::arg("k_s_stride"), py::arg("q_t"),
        py::arg("q_t_stride"), py::arg("k_t"), py::arg("k_t_stride"), py::arg("key_mask"), py::arg("mask_stride"),
        py::arg("sizes"), py::arg("alpha_s"), py::arg("alpha_t"), py::arg("grad_scale_q"), py::arg("grad_scale_k"),
        py::arg("head_energy"), py::arg("dq_s"), py::arg("dk_s"));
}

}  // namespace kdfast
