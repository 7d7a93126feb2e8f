// CPU row kernel of the chunked vocabulary KD (kdfast/chunked_vocab.py): OpenMP over rows, two
// vectorised passes over V per row (see vocab_kd_math.h for the arithmetic).
#include <algorithm>
#include <cstdint>

#include "ops.h"
#include "vocab_kd_math.h"

namespace kdfast {
namespace {

using vocab_kd::OnlineSum;
using vocab_kd::RowStats;

constexpr index_t kBlock = 512;  // elements per online step (2 KiB of each row, in L1)

// Maximum of a block of n elements.
inline float block_max(const float* x, index_t n) {
  float m = -FLT_MAX;
#pragma omp simd reduction(max : m)
  for (index_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// sum exp((x - max) * scale) over a block of n elements.
inline float block_exp_sum(const float* x, index_t n, float max, float scale) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (index_t i = 0; i < n; ++i) sum += vocab_kd::vocab_exp((x[i] - max) * scale);
  return sum;
}

struct RowResult {
  float kd;
  float mlm;
};

// One row: s [V] (overwritten with the gradient), t [V]. Pass 1 walks the row a block at a time:
// the block's maxima, its exp sums relative to them, then one online merge per softmax. Pass 2 writes
// the gradient and sums the KD terms. target_clones keeps the wheel portable while the hot loops get
// AVX-512/AVX2 code where the CPU has it.
__attribute__((target_clones("avx512f", "avx2", "default")))
RowResult kd_row(float* s, const float* t, index_t vocab, int64_t label, float kd_coef, float mlm_coef,
                 float temperature, bool soft_ce) {
  const float inv_t = 1.0f / temperature;
  const bool has_label = label >= 0;
  const bool raw_softmax = has_label && temperature != 1.0f;
  OnlineSum a = vocab_kd::online_empty(), b = vocab_kd::online_empty(), raw = vocab_kd::online_empty();
  for (index_t start = 0; start < vocab; start += kBlock) {
    const index_t n = std::min(kBlock, vocab - start);
    const float s_max = block_max(s + start, n), t_max = block_max(t + start, n);
    a = vocab_kd::online_merge(a, {s_max, block_exp_sum(s + start, n, s_max, inv_t)}, inv_t);
    b = vocab_kd::online_merge(b, {t_max, block_exp_sum(t + start, n, t_max, inv_t)}, inv_t);
    if (raw_softmax) raw = vocab_kd::online_merge(raw, {s_max, block_exp_sum(s + start, n, s_max, 1.0f)}, 1.0f);
  }
  RowStats st;
  st.inv_t = inv_t;
  st.s_max = a.max;
  st.t_max = b.max;
  st.log_sum_a = logf(a.sum);
  st.log_sum_b = logf(b.sum);
  st.log_sum_s = raw_softmax ? logf(raw.sum) : st.log_sum_a;
  st.kd_coef = kd_coef;
  st.mlm_coef = has_label ? mlm_coef : 0.0f;
  st.raw_softmax = raw_softmax;
  st.soft_ce = soft_ce;
  const float mlm = has_label ? vocab_kd::mlm_loss(st, s[label]) : 0.0f;

  float kd = 0.0f;
#pragma omp simd reduction(+ : kd)
  for (index_t v = 0; v < vocab; ++v) {
    const vocab_kd::ElementOut out = vocab_kd::element_grad(s[v], t[v], st);
    s[v] = out.grad;
    kd += out.kd_term;
  }
  if (has_label) s[label] -= st.mlm_coef;
  return {kd, mlm};
}

// Raw pointers from torch (fp32 / int64, rows `ld` elements apart); see the row kernel contract in
// kdfast/chunked_vocab.py.
void rows(std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, std::uintptr_t kd_coef,
          std::uintptr_t mlm_coef, std::uintptr_t kd_row_out, std::uintptr_t mlm_row_out, index_t n_rows,
          index_t vocab, index_t ld, float temperature, bool soft_ce) {
  auto* s_ptr = reinterpret_cast<float*>(s);
  const auto* t_ptr = reinterpret_cast<const float*>(t);
  const auto* label_ptr = reinterpret_cast<const int64_t*>(labels);
  const auto* kd_ptr = reinterpret_cast<const float*>(kd_coef);
  const auto* mlm_ptr = reinterpret_cast<const float*>(mlm_coef);
  auto* kd_out = reinterpret_cast<float*>(kd_row_out);
  auto* mlm_out = reinterpret_cast<float*>(mlm_row_out);
#pragma omp parallel for schedule(static)
  for (index_t r = 0; r < n_rows; ++r) {
    const RowResult res = kd_row(s_ptr + r * ld, t_ptr + r * ld, vocab, label_ptr[r], kd_ptr[r], mlm_ptr[r],
                                 temperature, soft_ce);
    kd_out[r] = res.kd;
    mlm_out[r] = res.mlm;
  }
}

}  // namespace

void register_vocab_kd(pybind11::module_& m) {
  m.def(
      "vocab_kd_rows",
      [](std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, std::uintptr_t kd_coef, std::uintptr_t mlm_coef,
         std::uintptr_t kd_row, std::uintptr_t mlm_row, index_t n_rows, index_t vocab, index_t ld, float temperature,
         bool soft_ce) {
        pybind11::gil_scoped_release release;
        rows(s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row, n_rows, vocab, ld, temperature, soft_ce);
      },
      "Vocabulary-KD row kernel, in place on fp32 student logits (see kdfast/chunked_vocab.py)",
      pybind11::arg("s"), pybind11::arg("t"), pybind11::arg("labels"), pybind11::arg("kd_coef"),
      pybind11::arg("mlm_coef"), pybind11::arg("kd_row"), pybind11::arg("mlm_row"), pybind11::arg("rows"),
      pybind11::arg("vocab"), pybind11::arg("ld"), pybind11::arg("temperature"), pybind11::arg("soft_ce"));
}

}  // namespace kdfast
