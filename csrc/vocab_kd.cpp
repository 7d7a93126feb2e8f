// CPU row kernels of the chunked vocabulary KD (driver: kdfast/functions/vocab_kd.py), OpenMP over rows, with the
// arithmetic of vocab_kd_math.h. Two layouts of the [C, V] logits:
//   row-major (element (r, v) at r*ld + v): two vectorised passes over V per row (kd_row);
//   vocab-major (element (r, v) at r + v*ld): kLanes neighbouring rows at a time, one SIMD lane per row,
//   each pass a walk over V (kd_lanes). The chunked driver asks for this layout on CPU because the
//   head products W [V, H] @ x^T [H, C] that fill it run faster in MKL than x @ W^T.
#include <algorithm>
#include <cstdint>

#include "ops.h"
#include "vocab_kd_math.h"

namespace kdfast {
namespace {

using vocab_kd::OnlineSum;
using vocab_kd::RowStats;

constexpr index_t kBlock = 512;  // row-major: elements per online step (2 KiB of each row, in L1)
constexpr index_t kLanes = 32;   // vocab-major: rows per group (128 contiguous bytes per step over V)
// Sums over V are two-level, in partial sums of kBlock elements: a fp32 sum of V = 262144 terms in one
// accumulator drifts ~sqrt(V) ulps (3e-5 relative), a bias every q of the row would share.

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

// The largest y[i] among the elements with x[i] == m (the block's maximum): the teacher logit at the student's
// argmax, one of them on ties. Vectorised, unlike a search for the index.
inline float value_at_max(const float* x, const float* y, index_t n, float m) {
  float out = -FLT_MAX;
#pragma omp simd reduction(max : out)
  for (index_t i = 0; i < n; ++i) out = std::max(out, x[i] == m ? y[i] : -FLT_MAX);
  return out;
}

// Pass::run<Raw>(args...) with Raw = raw (vocab_kd::raw_softmax_mode) as a template argument, so each pass's
// loop is compiled branch-free for its mode.
template <class Pass, class... Args>
inline __attribute__((always_inline)) auto with_raw_mode(int raw, Args&&... args) {
  return raw == vocab_kd::kRawIsQ      ? Pass::template run<vocab_kd::kRawIsQ>(args...)
         : raw == vocab_kd::kRawSquared ? Pass::template run<vocab_kd::kRawSquared>(args...)
                                        : Pass::template run<vocab_kd::kRawExp>(args...);
}

struct RowResult {
  float kd;
  float mlm;
};

// Reverse KL pass 1 over a block: sum exp((x - max)/T) and the exp-weighted deltas relative to (max, t_ref).
inline vocab_kd::DivSum block_div_sum(const float* x, const float* y, index_t n, float max, float t_ref,
                                      float inv_t) {
  float sum = 0.0f, acc = 0.0f;
#pragma omp simd reduction(+ : sum, acc)
  for (index_t i = 0; i < n; ++i) {
    const float d = x[i] - max;
    const float e = vocab_kd::vocab_exp(d * inv_t);
    sum += e;
    acc += e * ((d - (y[i] - t_ref)) * inv_t);
  }
  return {max, sum, acc, t_ref};
}

// Reverse KL pass 2 of one row-major row (k = sum q*delta from pass 1). Raw: raw_softmax_mode.
struct ReverseKlPass {
  template <int Raw>
  static inline __attribute__((always_inline)) void run(float* s, const float* t, index_t vocab,
                                                        const RowStats& st, float k) {
    const RowStats row = st;  // a local copy: the stores to s cannot alias it
#pragma omp simd
    for (index_t v = 0; v < vocab; ++v) s[v] = vocab_kd::reverse_kl_grad_as<Raw>(s[v], t[v], row, k);
  }
};

// JSD passes 2 and 3 of one row-major row (t becomes scratch); returns the row's KD term.
struct JsdPass {
  template <int Raw>
  static inline __attribute__((always_inline)) float run(float* s, float* t, index_t vocab, const RowStats& st) {
    float sum_q_delta = 0.0f, sum_p_term = 0.0f;
    for (index_t start = 0; start < vocab; start += kBlock) {
      float q_delta = 0.0f, p_term = 0.0f;
#pragma omp simd reduction(+ : q_delta, p_term)
      for (index_t v = start; v < std::min(vocab, start + kBlock); ++v) {
        const vocab_kd::JsdElement e = vocab_kd::jsd_element_as<Raw>(s[v], t[v], st);
        s[v] = e.grad;
        t[v] = e.q_coef;
        q_delta += e.q_delta;
        p_term += e.p_term;
      }
      sum_q_delta += q_delta, sum_p_term += p_term;
    }
    const vocab_kd::DivTotals totals = vocab_kd::div_finish(st, sum_q_delta, sum_p_term);
#pragma omp simd
    for (index_t v = 0; v < vocab; ++v) s[v] -= totals.k * t[v];
    return totals.kd;
  }
};

// Out of line (and cloned per instruction set, with the passes inlined into each clone), so kd_row stays
// small enough for GCC to inline and vectorise its element math.
__attribute__((target_clones("avx512f", "avx2", "default"), noinline))
void reverse_kl_passes(float* s, const float* t, index_t vocab, const RowStats& st, float k) {
  with_raw_mode<ReverseKlPass>(vocab_kd::raw_softmax_mode(st), s, t, vocab, st, k);
}

__attribute__((target_clones("avx512f", "avx2", "default"), noinline))
float jsd_passes(float* s, float* t, index_t vocab, const RowStats& st) {
  return with_raw_mode<JsdPass>(vocab_kd::raw_softmax_mode(st), s, t, vocab, st);
}

// Forward KL / soft CE pass 2 of one row-major row; returns the row's KD term. Raw: raw_softmax_mode.
struct KlPass {
  template <int Raw>
  static inline __attribute__((always_inline)) float run(float* s, const float* t, index_t vocab, const RowStats& st) {
    float kd = 0.0f;
    for (index_t start = 0; start < vocab; start += kBlock) {
      float kd_block = 0.0f;
#pragma omp simd reduction(+ : kd_block)
      for (index_t v = start; v < std::min(vocab, start + kBlock); ++v) {
        const vocab_kd::ElementOut out = vocab_kd::element_grad_as<Raw>(s[v], t[v], st);
        s[v] = out.grad;
        kd_block += out.kd_term;
      }
      kd += kd_block;
    }
    return kd;
  }
};

// One row-major row: s [V] (overwritten with the gradient), t [V] (scratch for JSD). Pass 1 walks the row a
// block at a time: the block's maxima, its exp sums relative to them (reverse KL: with its deltas), then one
// online merge per softmax. Pass 2 writes the gradient and sums the KD terms (JSD: jsd_passes). target_clones
// keeps the wheel portable while the hot loops get AVX-512/AVX2 code where the CPU has it.
__attribute__((target_clones("avx512f", "avx2", "default")))
RowResult kd_row(float* s, float* t, index_t vocab, int64_t label, float kd_coef, float mlm_coef,
                 float temperature, int kind, float beta) {
  const float inv_t = 1.0f / temperature;
  const bool has_label = label >= 0;
  const bool raw_softmax = has_label && temperature != 1.0f;
  const bool reverse = kind == vocab_kd::kReverseKL;
  OnlineSum a = vocab_kd::online_empty(), b = vocab_kd::online_empty(), raw = vocab_kd::online_empty();
  vocab_kd::DivSum a_div = vocab_kd::div_empty();
  float t_ref = 0.0f;
  for (index_t start = 0; start < vocab; start += kBlock) {
    const index_t n = std::min(kBlock, vocab - start);
    const float s_max = block_max(s + start, n), t_max = block_max(t + start, n);
    if (reverse) {
      const float t_at = value_at_max(s + start, t + start, n, s_max);
      a_div = vocab_kd::div_merge(a_div, block_div_sum(s + start, t + start, n, s_max, t_at, inv_t), inv_t);
    } else {
      if (kind == vocab_kd::kJSD && s_max > a.max) t_ref = value_at_max(s + start, t + start, n, s_max);
      a = vocab_kd::online_merge(a, {s_max, block_exp_sum(s + start, n, s_max, inv_t)}, inv_t);
    }
    b = vocab_kd::online_merge(b, {t_max, block_exp_sum(t + start, n, t_max, inv_t)}, inv_t);
    if (raw_softmax) raw = vocab_kd::online_merge(raw, {s_max, block_exp_sum(s + start, n, s_max, 1.0f)}, 1.0f);
  }
  if (reverse) a = {a_div.max, a_div.sum}, t_ref = a_div.t_ref;
  const RowStats st = vocab_kd::row_stats(a, b, raw, temperature, has_label, kd_coef, mlm_coef, kind, beta, t_ref);
  const float mlm = has_label ? vocab_kd::mlm_loss(st, s[label]) : 0.0f;

  float kd = 0.0f;
  if (reverse) {
    const float k = a_div.acc / a_div.sum;
    kd = vocab_kd::div_finish(st, k, 0.0f).kd;
    reverse_kl_passes(s, t, vocab, st, k);
  } else if (kind == vocab_kd::kJSD) {
    kd = jsd_passes(s, t, vocab, st);
  } else {
    kd = with_raw_mode<KlPass>(vocab_kd::raw_softmax_mode(st), s, t, vocab, st);
  }
  if (has_label) s[label] -= st.mlm_coef;
  return {kd, mlm};
}

// Vocab-major walks step ld elements per v, a new 4 KiB page every few steps, where the hardware prefetchers stop:
// fetch both operands' kLanes entries kAhead steps ahead.
constexpr index_t kAhead = 16;
inline void prefetch_ahead(const float* s, const float* t, index_t v, index_t ld) {
  __builtin_prefetch(s + (v + kAhead) * ld);
  __builtin_prefetch(s + (v + kAhead) * ld + 16);
  __builtin_prefetch(t + (v + kAhead) * ld);
  __builtin_prefetch(t + (v + kAhead) * ld + 16);
}

// Online (max, sum) states of kLanes rows, one array per field so a loop over the lanes vectorises.
struct LaneSums {
  float max[kLanes];
  float sum[kLanes];

  LaneSums() {
    for (index_t l = 0; l < kLanes; ++l) max[l] = -FLT_MAX, sum[l] = 0.0f;
  }
  OnlineSum at(index_t l) const { return {max[l], sum[l]}; }
  // Add x[l] to lane l for the first n lanes.
  void add(const float* x, index_t n, float scale) {
#pragma omp simd
    for (index_t l = 0; l < n; ++l) {
      const OnlineSum out = vocab_kd::online_add({max[l], sum[l]}, x[l], scale);
      max[l] = out.max;
      sum[l] = out.sum;
    }
  }
  // At T = 2: add(x, n, 1/2) and raw.add(x, n, 1) in one exp per element (online_add_squared); raw keeps
  // the maxima of these lanes.
  void add_squared(const float* x, index_t n, LaneSums& raw) {
#pragma omp simd
    for (index_t l = 0; l < n; ++l) {
      const vocab_kd::OnlinePair out = vocab_kd::online_add_squared({max[l], sum[l]}, raw.sum[l], x[l]);
      max[l] = raw.max[l] = out.a.max;
      sum[l] = out.a.sum;
      raw.sum[l] = out.raw_sum;
    }
  }
  // Merge the partial states of o into the first n lanes.
  void merge(const LaneSums& o, index_t n, float scale) {
#pragma omp simd
    for (index_t l = 0; l < n; ++l) {
      const OnlineSum out = vocab_kd::online_merge({max[l], sum[l]}, o.at(l), scale);
      max[l] = out.max;
      sum[l] = out.sum;
    }
  }
};

// Reverse KL pass 1 states (vocab_kd::DivSum) of kLanes rows, one array per field.
struct LaneDivSums {
  float max[kLanes], sum[kLanes], acc[kLanes], t_ref[kLanes];

  LaneDivSums() {
    for (index_t l = 0; l < kLanes; ++l) max[l] = -FLT_MAX, sum[l] = acc[l] = t_ref[l] = 0.0f;
  }
  // Add element (x[l], y[l]) to lane l for the first n lanes.
  void add(const float* x, const float* y, index_t n, float inv_t) {
#pragma omp simd
    for (index_t l = 0; l < n; ++l) {
      const vocab_kd::DivSum out = vocab_kd::div_add({max[l], sum[l], acc[l], t_ref[l]}, x[l], y[l], inv_t);
      max[l] = out.max, sum[l] = out.sum, acc[l] = out.acc, t_ref[l] = out.t_ref;
    }
  }
  void merge(const LaneDivSums& o, index_t n, float inv_t) {
#pragma omp simd
    for (index_t l = 0; l < n; ++l) {
      const vocab_kd::DivSum out = vocab_kd::div_merge({max[l], sum[l], acc[l], t_ref[l]},
                                                       {o.max[l], o.sum[l], o.acc[l], o.t_ref[l]}, inv_t);
      max[l] = out.max, sum[l] = out.sum, acc[l] = out.acc, t_ref[l] = out.t_ref;
    }
  }
};

// Per-row statistics of kLanes rows (RowStats fields that differ between rows), one array per field,
// and the fields shared by all lanes.
// raw_softmax is one flag for all lanes (T != 1 and some lane has a label): a lane without a label has
// mlm_coef 0, so its softmax(s) term vanishes whichever way it is computed.
struct LaneStats {
  float s_max[kLanes], t_max[kLanes], log_sum_a[kLanes], log_sum_b[kLanes], log_sum_s[kLanes];
  float inv_sum_a[kLanes], inv_sum_b[kLanes], inv_sum_s[kLanes];
  float kd_coef[kLanes], mlm_coef[kLanes], t_ref[kLanes], sp_ref[kLanes], zeta0[kLanes];
  float k[kLanes];  // sum q*delta of the row (reverse KL: after pass 1; JSD: after pass 2)
  float inv_t, beta, log_beta, log_1m_beta, div_w;
  bool raw_softmax;
  int kind;

  float one_m_beta;

  void set(index_t l, const RowStats& st) {
    s_max[l] = st.s_max, t_max[l] = st.t_max, log_sum_a[l] = st.log_sum_a, log_sum_b[l] = st.log_sum_b;
    log_sum_s[l] = st.log_sum_s, inv_sum_a[l] = st.inv_sum_a, inv_sum_b[l] = st.inv_sum_b;
    inv_sum_s[l] = st.inv_sum_s, kd_coef[l] = st.kd_coef, mlm_coef[l] = st.mlm_coef;
    t_ref[l] = st.t_ref, sp_ref[l] = st.sp_ref, zeta0[l] = st.zeta0;
    inv_t = st.inv_t, beta = st.beta, log_beta = st.log_beta, log_1m_beta = st.log_1m_beta, div_w = st.div_w;
    one_m_beta = st.one_m_beta, kind = st.kind;
  }
  // Built field by field (not copied from a RowStats), which keeps the lane loops vectorised.
  RowStats at(index_t l) const {
    return {inv_t,        s_max[l],     t_max[l],   log_sum_a[l], log_sum_b[l], log_sum_s[l], inv_sum_a[l],
            inv_sum_b[l], inv_sum_s[l], kd_coef[l], mlm_coef[l],  raw_softmax,  kind,         t_ref[l],
            beta,         log_beta,     log_1m_beta, one_m_beta,  div_w,       sp_ref[l],    zeta0[l]};
  }
};

// Reverse KL pass 2 of n <= kLanes vocab-major rows (st.k from pass 1).
struct ReverseKlLanePass {
  template <int Raw>
  static inline __attribute__((always_inline)) void run(float* s, const float* t, index_t n, index_t vocab,
                                                        index_t ld, const LaneStats& st) {
    for (index_t v = 0; v < vocab; ++v) {
      prefetch_ahead(s, t, v, ld);
      float* sv = s + v * ld;
      const float* tv = t + v * ld;
#pragma omp simd
      for (index_t l = 0; l < n; ++l) sv[l] = vocab_kd::reverse_kl_grad_as<Raw>(sv[l], tv[l], st.at(l), st.k[l]);
    }
  }
};

// JSD passes 2 and 3 of n <= kLanes vocab-major rows (t becomes scratch); writes the rows' KD terms to kd.
struct JsdLanePasses {
  template <int Raw>
  static inline __attribute__((always_inline)) void run(float* s, float* t, index_t n, index_t vocab, index_t ld,
                                                        LaneStats& st_out, float* kd) {
    const LaneStats st = st_out;  // a local copy: the stores to s and t cannot alias it
    float sum_q_delta[kLanes] = {}, sum_p_term[kLanes] = {};
    for (index_t start = 0; start < vocab; start += kBlock) {
      float q_delta[kLanes] = {}, p_term[kLanes] = {};
      for (index_t v = start; v < std::min(vocab, start + kBlock); ++v) {
        prefetch_ahead(s, t, v, ld);
        float* sv = s + v * ld;
        float* tv = t + v * ld;
#pragma omp simd
        for (index_t l = 0; l < n; ++l) {
          const vocab_kd::JsdElement e = vocab_kd::jsd_element_as<Raw>(sv[l], tv[l], st.at(l));
          sv[l] = e.grad;
          tv[l] = e.q_coef;
          q_delta[l] += e.q_delta;
          p_term[l] += e.p_term;
        }
      }
      for (index_t l = 0; l < n; ++l) sum_q_delta[l] += q_delta[l], sum_p_term[l] += p_term[l];
    }
    for (index_t l = 0; l < n; ++l) {
      const vocab_kd::DivTotals totals = vocab_kd::div_finish(st.at(l), sum_q_delta[l], sum_p_term[l]);
      kd[l] = totals.kd;
      st_out.k[l] = totals.k;
    }
    float k[kLanes];
    for (index_t l = 0; l < n; ++l) k[l] = st_out.k[l];
    for (index_t v = 0; v < vocab; ++v) {
      prefetch_ahead(s, t, v, ld);
      float* sv = s + v * ld;
      const float* tv = t + v * ld;
#pragma omp simd
      for (index_t l = 0; l < n; ++l) sv[l] -= k[l] * tv[l];
    }
  }
};

__attribute__((target_clones("avx512f", "avx2", "default"), noinline))
void reverse_kl_lanes(float* s, const float* t, index_t n, index_t vocab, index_t ld, const LaneStats& st) {
  with_raw_mode<ReverseKlLanePass>(vocab_kd::raw_softmax_mode(st.at(0)), s, t, n, vocab, ld, st);
}

__attribute__((target_clones("avx512f", "avx2", "default"), noinline))
void jsd_lanes(float* s, float* t, index_t n, index_t vocab, index_t ld, LaneStats& st, float* kd) {
  with_raw_mode<JsdLanePasses>(vocab_kd::raw_softmax_mode(st.at(0)), s, t, n, vocab, ld, st, kd);
}

// Forward KL / soft CE pass 2 of n <= kLanes vocab-major rows; adds the rows' KD terms to kd. Raw:
// raw_softmax_mode, one for all lanes (see LaneStats).
struct KlLanePass {
  template <int Raw>
  static inline __attribute__((always_inline)) void run(float* s, const float* t, index_t n, index_t vocab,
                                                        index_t ld, const LaneStats& st, float* kd) {
    for (index_t start = 0; start < vocab; start += kBlock) {
      float kd_block[kLanes] = {};
      for (index_t v = start; v < std::min(vocab, start + kBlock); ++v) {
        prefetch_ahead(s, t, v, ld);
        float* sv = s + v * ld;
        const float* tv = t + v * ld;
#pragma omp simd
        for (index_t l = 0; l < n; ++l) {
          const vocab_kd::ElementOut out = vocab_kd::element_grad_as<Raw>(sv[l], tv[l], st.at(l));
          sv[l] = out.grad;
          kd_block[l] += out.kd_term;
        }
      }
      for (index_t l = 0; l < n; ++l) kd[l] += kd_block[l];
    }
  }
};

// n <= kLanes vocab-major rows: element (l, v) of s and t at l + v*ld. Every per-row quantity lives in a
// lane array, so each step over v is one vector operation across the rows. The arithmetic per element is
// the row-major kernel's (online_add instead of block merges: the same sums up to rounding).
__attribute__((target_clones("avx512f", "avx2", "default")))
void kd_lanes(float* s, float* t, index_t n, index_t vocab, index_t ld, const int64_t* label,
              const float* kd_coef, const float* mlm_coef, float temperature, int kind, float beta, float* kd_out,
              float* mlm_out) {
  const float inv_t = 1.0f / temperature;
  const bool reverse = kind == vocab_kd::kReverseKL, jsd = kind == vocab_kd::kJSD;
  bool raw_softmax = false;
  for (index_t l = 0; l < n; ++l) raw_softmax |= label[l] >= 0 && temperature != 1.0f;
  LaneSums a, b, raw;
  LaneDivSums a_div;  // reverse KL's pass-1 states, in place of a
  float t_ref[kLanes] = {};
  for (index_t start = 0; start < vocab; start += kBlock) {
    LaneSums pa, pb, praw;  // this block's partial states
    LaneDivSums pa_div;
    float t_ref_block[kLanes] = {};
    for (index_t v = start; v < std::min(vocab, start + kBlock); ++v) {
      prefetch_ahead(s, t, v, ld);
      if (jsd) {
#pragma omp simd
        for (index_t l = 0; l < n; ++l) {
          const float x = s[l + v * ld], y = t[l + v * ld];  // both loaded: a masked load is slow
          t_ref_block[l] = x > pa.max[l] ? y : t_ref_block[l];
        }
      }
      if (reverse) {
        pa_div.add(s + v * ld, t + v * ld, n, inv_t);
        if (raw_softmax) praw.add(s + v * ld, n, 1.0f);
      } else if (raw_softmax && vocab_kd::raw_is_square(inv_t)) {
        pa.add_squared(s + v * ld, n, praw);
      } else {
        pa.add(s + v * ld, n, inv_t);
        if (raw_softmax) praw.add(s + v * ld, n, 1.0f);
      }
      pb.add(t + v * ld, n, inv_t);
    }
    if (jsd) {
      for (index_t l = 0; l < n; ++l) t_ref[l] = pa.max[l] > a.max[l] ? t_ref_block[l] : t_ref[l];
    }
    if (reverse) a_div.merge(pa_div, n, inv_t);
    a.merge(pa, n, inv_t);
    b.merge(pb, n, inv_t);
    if (raw_softmax) raw.merge(praw, n, 1.0f);
  }
  LaneStats st;
  st.raw_softmax = raw_softmax;
  float kd[kLanes];
  for (index_t l = 0; l < n; ++l) {
    const bool has_label = label[l] >= 0;
    const OnlineSum a_row = reverse ? OnlineSum{a_div.max[l], a_div.sum[l]} : a.at(l);
    RowStats row = vocab_kd::row_stats(a_row, b.at(l), raw.at(l), temperature, has_label, kd_coef[l], mlm_coef[l],
                                       kind, beta, reverse ? a_div.t_ref[l] : t_ref[l]);
    st.set(l, row);
    mlm_out[l] = has_label ? vocab_kd::mlm_loss(row, s[l + label[l] * ld]) : 0.0f;
    st.k[l] = reverse ? a_div.acc[l] / a_div.sum[l] : 0.0f;
    kd[l] = reverse ? vocab_kd::div_finish(row, st.k[l], 0.0f).kd : 0.0f;
  }
  if (reverse) {
    reverse_kl_lanes(s, t, n, vocab, ld, st);
  } else if (kind == vocab_kd::kJSD) {
    jsd_lanes(s, t, n, vocab, ld, st, kd);
  } else {
    with_raw_mode<KlLanePass>(vocab_kd::raw_softmax_mode(st.at(0)), s, t, n, vocab, ld, st, kd);
  }
  for (index_t l = 0; l < n; ++l) {
    if (label[l] >= 0) s[l + label[l] * ld] -= st.mlm_coef[l];
    kd_out[l] = kd[l];
  }
}

struct RowArgs {
  float* s;
  float* t;  // scratch for JSD
  const int64_t* labels;
  const float* kd_coef;
  const float* mlm_coef;
  float* kd_out;
  float* mlm_out;
};

RowArgs row_args(std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, std::uintptr_t kd_coef,
                 std::uintptr_t mlm_coef, std::uintptr_t kd_row_out, std::uintptr_t mlm_row_out) {
  return {reinterpret_cast<float*>(s),          reinterpret_cast<float*>(t),
          reinterpret_cast<const int64_t*>(labels), reinterpret_cast<const float*>(kd_coef),
          reinterpret_cast<const float*>(mlm_coef), reinterpret_cast<float*>(kd_row_out),
          reinterpret_cast<float*>(mlm_row_out)};
}

// Row-major: rows `ld` elements apart, unit stride along V.
void rows(const RowArgs& x, index_t n_rows, index_t vocab, index_t ld, float temperature, int kind, float beta) {
#pragma omp parallel for schedule(static)
  for (index_t r = 0; r < n_rows; ++r) {
    const RowResult res = kd_row(x.s + r * ld, x.t + r * ld, vocab, x.labels[r], x.kd_coef[r], x.mlm_coef[r],
                                 temperature, kind, beta);
    x.kd_out[r] = res.kd;
    x.mlm_out[r] = res.mlm;
  }
}

// Vocab-major: unit stride along rows, consecutive vocabulary entries `ld` elements apart.
void rows_vocab_major(const RowArgs& x, index_t n_rows, index_t vocab, index_t ld, float temperature,
                      int kind, float beta) {
  const index_t groups = (n_rows + kLanes - 1) / kLanes;
#pragma omp parallel for schedule(static)
  for (index_t g = 0; g < groups; ++g) {
    const index_t r = g * kLanes;
    kd_lanes(x.s + r, x.t + r, std::min(kLanes, n_rows - r), vocab, ld, x.labels + r, x.kd_coef + r,
             x.mlm_coef + r, temperature, kind, beta, x.kd_out + r, x.mlm_out + r);
  }
}

}  // namespace

void register_vocab_kd(pybind11::module_& m) {
  // Raw pointers from torch (fp32 / int64); see the row kernel contract in DEVELOPING.md
  // ("Vocabulary KD chunked driver") and kdfast/functions/vocab_kd.py.
  using Layout = void (*)(const RowArgs&, index_t, index_t, index_t, float, int, float);
  const auto bind = [&m](const char* name, Layout layout, const char* doc) {
    m.def(
        name,
        [layout](std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, std::uintptr_t kd_coef,
                 std::uintptr_t mlm_coef, std::uintptr_t kd_row, std::uintptr_t mlm_row, index_t n_rows,
                 index_t vocab, index_t ld, float temperature, int kind, float beta) {
          pybind11::gil_scoped_release release;
          layout(row_args(s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row), n_rows, vocab, ld, temperature, kind,
                 beta);
        },
        doc, pybind11::arg("s"), pybind11::arg("t"), pybind11::arg("labels"), pybind11::arg("kd_coef"),
        pybind11::arg("mlm_coef"), pybind11::arg("kd_row"), pybind11::arg("mlm_row"), pybind11::arg("rows"),
        pybind11::arg("vocab"), pybind11::arg("ld"), pybind11::arg("temperature"), pybind11::arg("kind"),
        pybind11::arg("beta"));
  };
  bind("vocab_kd_rows", rows,
       "Vocabulary-KD row kernel, in place on row-major fp32 student logits (rows ld apart)");
  bind("vocab_kd_rows_vocab_major", rows_vocab_major,
       "Vocabulary-KD row kernel, in place on vocab-major fp32 student logits (vocabulary entries ld apart)");
}

}  // namespace kdfast
