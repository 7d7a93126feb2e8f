// Arithmetic of one vocabulary-KD row, shared by the CPU kernel (csrc/vocab_kd.cpp) and the CUDA
// kernel (kernels/vocab_kd.cu), so the CPU tests execute the device math.
//
// For a row: s student logits, t teacher logits, T temperature, a = s/T, b = t/T,
// q = softmax(a), p = softmax(b), optional label y.
// Forward KL / soft CE (two passes):
//   pass 1: online (max, sum) of exp for a, b and (when T != 1 and the row has a label) s;
//   pass 2: per element, grad = kd_coef*(q - p) + mlm_coef*(softmax(s) - onehot(y)) and the KD term
//           p*(log p - log q) (KL) or -p*log q (soft CE), summed into the row's loss.
// Reverse KL (two passes): pass 1 also keeps k = sum q*delta online (DivSum: exp-weighted sums of delta
//   relative to the running argmax, moved to a new reference when the max moves), so
//   pass 2 writes grad = kd_coef*q*(delta - k) + mlm_coef*(softmax(s) - onehot(y)) (reverse_kl_grad_as): one exp.
// Generalised JSD (two passes and a light third): pass 1 as for KL, plus t_ref;
//   pass 2 (jsd_element_as) writes grad without the k term into s, kd_coef*w*q into t (t is scratch), and
//   sums q*delta and the teacher terms; pass 3: s -= k*t, no transcendental.
// Both gradients have the form w*q*(D - sum q D) with D = log q - log p (reverse KL, w = 1) or
// D = log q - log m (JSD_beta = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q, w = 1-beta).
// delta = D - D_r is taken relative to the student's argmax r, k = sum q*delta: a near one-hot student
// then keeps its small gradient q_r*(delta_r - k) = -q_r*k (no difference of two large numbers).
// Reverse KL R = D_r + k. For JSD, with zeta = log p - log q + log(beta/(1-beta)) and sp = softplus:
// D = -log(1-beta) - sp(zeta) and log p - log m = -log(beta) - sp(-zeta), so delta = sp(zeta_r) - sp(zeta) stays
// accurate (to its own size) where p << q, and JSD = beta sum p (-log beta - sp(-zeta)) + (1-beta) (D_r + k).
// sp(+-zeta) = max(+-zeta, 0) + log1p(exp(-|zeta|)), and exp(-|zeta|) = min(beta p, (1-beta) q) / max(...) from
// the element's two exps; zeta = (b - a) + zeta0 with a per-row zeta0, and log1p of that ratio is a short series
// (vocab_log1p_ratio): per element two exps and one division, no log (was two exps, a log and two divisions).
// JSD needs 0 < beta < 1 (beta = 0 and 1 are forward and reverse KL: kdfast._reduction.kd_term).
#pragma once
#include <cfloat>
#include <cmath>
#include <cstring>

#include "common.h"

// KDFAST_HD, and on the host always inlined: with many call sites GCC may keep these out of line, and the
// row loops that call them would no longer vectorise (5x slower).
#if defined(__CUDACC__)
#define VOCAB_KD_HD KDFAST_HD
#else
#define VOCAB_KD_HD KDFAST_HD __attribute__((always_inline))
#endif

namespace kdfast::vocab_kd {

// The KD term of a row (kdfast._reduction.KINDS in this order).
enum Kind : int { kForwardKL = 0, kSoftCE = 1, kReverseKL = 2, kJSD = 3 };

// Below this exp() is subnormal in fp32; vocab_exp returns 0 there (also for -inf: top-k).
constexpr float kExpFloor = -87.0f;

VOCAB_KD_HD float round_to_int(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  // Adding 1.5 * 2^23 rounds to an integer under IEEE round-to-nearest (|x| < 2^22 here) and,
  // unlike rintf, vectorises with any instruction set.
  const float magic = 12582912.0f;
  return (x + magic) - magic;
#endif
}

VOCAB_KD_HD float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// exp(x) for x <= 0, about 1 ulp (Cephes expf): x = n*ln2 + r, |r| <= ln2/2, a degree-6
// polynomial for exp(r), 2^n from the exponent bits. Branch-free, so loops over it vectorise.
VOCAB_KD_HD float vocab_exp(float x) {
  const float xc = x < kExpFloor ? kExpFloor : x;
  const float n = round_to_int(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return x < kExpFloor ? 0.0f : y * scale;
}

// Online softmax normaliser of x*scale: max is the largest raw x seen, sum = sum exp((x - max)*scale).
// Working on raw differences (x - max) first keeps them exact, so large logits lose no precision.
struct OnlineSum {
  float max;
  float sum;
};

VOCAB_KD_HD OnlineSum online_empty() { return {-FLT_MAX, 0.0f}; }

// Add one element. Branch-free (one exp either way), so a loop over independent states vectorises.
VOCAB_KD_HD OnlineSum online_add(OnlineSum acc, float x, float scale) {
  const bool up = x > acc.max;
  const float e = vocab_exp((up ? acc.max - x : x - acc.max) * scale);
  return {up ? x : acc.max, up ? acc.sum * e + 1.0f : acc.sum + e};
}

// At T = 2, online_add of x to a (scale 1/2) and to raw (scale 1), whose maxima are a's: raw's exp is the
// square of a's (exp(d) = exp(d/2)^2), so the softmax of s for the MLM term costs no exp of its own.
struct OnlinePair {
  OnlineSum a;
  float raw_sum;
};

VOCAB_KD_HD OnlinePair online_add_squared(OnlineSum a, float raw_sum, float x) {
  const bool up = x > a.max;
  const float e = vocab_exp((up ? a.max - x : x - a.max) * 0.5f);
  const float e2 = e * e;
  return {{up ? x : a.max, up ? a.sum * e + 1.0f : a.sum + e}, up ? raw_sum * e2 + 1.0f : raw_sum + e2};
}

// Combine two partial states (threads, warps, or a CPU block into its row).
VOCAB_KD_HD OnlineSum online_merge(OnlineSum a, OnlineSum b, float scale) {
  const float m = a.max > b.max ? a.max : b.max;
  return {m, a.sum * vocab_exp((a.max - m) * scale) + b.sum * vocab_exp((b.max - m) * scale)};
}

// What pass 2 needs for a row. log softmax(s/T)_v = (s_v - s_max)/T - log_sum_a, and likewise for t.
struct RowStats {
  float inv_t;       // 1/T
  float s_max;       // max of the student logits
  float t_max;       // max of the teacher logits
  float log_sum_a;   // log sum exp((s - s_max)/T)
  float log_sum_b;   // log sum exp((t - t_max)/T)
  float log_sum_s;   // log sum exp(s - s_max) (= log_sum_a when T == 1); read when raw_softmax
  float inv_sum_a;   // 1 / sum exp((s - s_max)/T), so q = exp((s - s_max)/T) * inv_sum_a
  float inv_sum_b;   // 1 / sum exp((t - t_max)/T)
  float inv_sum_s;   // 1 / sum exp(s - s_max)
  float kd_coef;     // gradient coefficient of d kd_row / d a
  float mlm_coef;    // gradient coefficient of softmax(s) - onehot(y)
  bool raw_softmax;  // softmax(s) differs from q (T != 1) and the row has an MLM term
  int kind;          // Kind
  // Reverse KL / JSD only:
  float t_ref;       // teacher logit at the student's argmax r
  float beta;        // JSD mixture weight of p, 0 < beta < 1
  float log_beta;    // log beta
  float log_1m_beta; // log(1 - beta)
  float one_m_beta;  // 1 - beta
  float div_w;       // w: 1 (reverse KL) or 1 - beta (JSD)
  float sp_ref;      // JSD: sp(z_r)
  float zeta0;       // JSD: (log_sum_a - log_sum_b) + log(beta/(1-beta)), so zeta = (b - a) + zeta0
};

// log(1 + lo/hi) for 0 <= lo <= hi (0 when hi = 0), accurate for tiny lo/hi: 2 atanh(w) with w = lo/(2 hi + lo)
// in [0, 1/3], a series in w^2 <= 1/9 (truncation below 2e-8 relative). One division, no log.
VOCAB_KD_HD float vocab_log1p_ratio(float lo, float hi) {
  const float w = lo / (hi > 0.0f ? 2.0f * hi + lo : 1.0f);
  const float z = w * w;
  float y = 1.0f / 13.0f;
  y = y * z + 1.0f / 11.0f;
  y = y * z + 1.0f / 9.0f;
  y = y * z + 1.0f / 7.0f;
  y = y * z + 1.0f / 5.0f;
  y = y * z + 1.0f / 3.0f;
  y = y * z + 1.0f;
  return 2.0f * w * y;
}

// JSD: softplus(zeta) and softplus(-zeta) of one element, zeta = log p - log q + log(beta/(1-beta)) =
// (b - a) + zeta0 (-inf where p = 0), from a = (s - s_max)/T, b = (t - t_max)/T and q, p; exp(-|zeta|) is
// min/max of beta p and (1-beta) q. row_stats takes sp_ref from it too (a = 0, q = inv_sum_a), so the argmax's
// delta is exactly 0.
struct JsdSoftplus {
  float pos;
  float neg;
};

VOCAB_KD_HD JsdSoftplus jsd_softplus(float a, float b, float q, float p, const RowStats& st) {
  const float zeta = (b - a) + st.zeta0;
  const float bp = st.beta * p, bq = st.one_m_beta * q;
  const float log1p_e = vocab_log1p_ratio(bp > bq ? bq : bp, bp > bq ? bp : bq);
  return {(zeta > 0.0f ? zeta : 0.0f) + log1p_e, (zeta < 0.0f ? -zeta : 0.0f) + log1p_e};
}

// Reverse KL pass 1: the online softmax normaliser of s/T (max, sum) and acc = sum exp((s - max)/T)*delta, with
// delta = ((s - max) - (t - t_ref))/T relative to the element holding the max (teacher logit t_ref).
struct DivSum {
  float max;
  float sum;
  float acc;
  float t_ref;
};

VOCAB_KD_HD DivSum div_empty() { return {-FLT_MAX, 0.0f, 0.0f, 0.0f}; }

// Add element (x, y) = (student, teacher) logits. Branch-free. When x becomes the max, the old terms move to
// the new reference (each delta drops by x's delta d w.r.t. the old one) and scale by exp((old max - x)/T).
VOCAB_KD_HD DivSum div_add(DivSum acc, float x, float y, float inv_t) {
  const bool up = x > acc.max;
  const float d = ((x - acc.max) - (y - acc.t_ref)) * inv_t;
  const float e = vocab_exp((up ? acc.max - x : x - acc.max) * inv_t);
  const float moved = acc.acc - (acc.sum > 0.0f ? acc.sum * d : 0.0f);  // an empty state has d = +-huge
  return {up ? x : acc.max, up ? acc.sum * e + 1.0f : acc.sum + e, up ? moved * e : acc.acc + e * d,
          up ? y : acc.t_ref};
}

// Combine two partial states; the larger max's reference (a's on ties) is kept.
VOCAB_KD_HD DivSum div_merge(DivSum a, DivSum b, float inv_t) {
  const bool take_b = b.max > a.max;  // field by field (a select of whole structs goes to local memory on GPUs)
  const float hi_max = take_b ? b.max : a.max, lo_max = take_b ? a.max : b.max;
  const float hi_sum = take_b ? b.sum : a.sum, lo_sum = take_b ? a.sum : b.sum;
  const float hi_acc = take_b ? b.acc : a.acc, lo_acc = take_b ? a.acc : b.acc;
  const float hi_ref = take_b ? b.t_ref : a.t_ref, lo_ref = take_b ? a.t_ref : b.t_ref;
  const float d = ((lo_max - hi_max) - (lo_ref - hi_ref)) * inv_t;  // delta_hi = delta_lo + d
  const float e = vocab_exp((lo_max - hi_max) * inv_t);
  return {hi_max, hi_sum + lo_sum * e, hi_acc + (lo_sum > 0.0f ? (lo_acc + lo_sum * d) * e : 0.0f), hi_ref};
}

// The row's statistics from its pass-1 states: a over s/T, b over t/T, raw over s (read only when
// raw_softmax: T != 1 and the row has a label).
VOCAB_KD_HD RowStats row_stats(OnlineSum a, OnlineSum b, OnlineSum raw, float temperature, bool has_label,
                             float kd_coef, float mlm_coef, int kind, float beta, float t_ref) {
  RowStats st;
  st.inv_t = 1.0f / temperature;
  st.s_max = a.max;
  st.t_max = b.max;
  st.log_sum_a = logf(a.sum);
  st.log_sum_b = logf(b.sum);
  st.raw_softmax = has_label && temperature != 1.0f;
  st.log_sum_s = st.raw_softmax ? logf(raw.sum) : st.log_sum_a;
  st.inv_sum_a = 1.0f / a.sum;
  st.inv_sum_b = 1.0f / b.sum;
  st.inv_sum_s = st.raw_softmax ? 1.0f / raw.sum : st.inv_sum_a;
  st.kd_coef = kd_coef;
  st.mlm_coef = has_label ? mlm_coef : 0.0f;
  st.kind = kind;
  st.t_ref = t_ref;
  st.beta = beta;
  st.log_beta = logf(beta);
  st.log_1m_beta = logf(1.0f - beta);
  st.one_m_beta = 1.0f - beta;
  st.div_w = kind == kReverseKL ? 1.0f : 1.0f - beta;
  st.zeta0 = (st.log_sum_a - st.log_sum_b) + (st.log_beta - st.log_1m_beta);
  // The student's argmax r (a = 0, q = 1 * inv_sum_a), as jsd_element_as computes it there.
  const float b_r = (t_ref - st.t_max) * st.inv_t;
  st.sp_ref = kind == kJSD ? jsd_softplus(0.0f, b_r, 1.0f * st.inv_sum_a, vocab_exp(b_r) * st.inv_sum_b, st).pos
                           : 0.0f;
  return st;
}

struct ElementOut {
  float grad;     // d loss / d s, without the -mlm_coef at the label
  float kd_term;  // this element's share of KL(p || q) or of the soft CE
};

// How pass 2 takes softmax(s), the MLM term's softmax at T = 1: it is q (T == 1, or the row has no MLM
// term), the square of q's exp (T == 2), or an exp of its own.
enum RawSoftmax : int { kRawIsQ = 0, kRawSquared = 1, kRawExp = 2 };

// Whether exp(d * inv_t)^2 = exp(d): the softmax at T = 1 from the square of the exp at 1/T (T = 2).
VOCAB_KD_HD bool raw_is_square(float inv_t) { return inv_t == 0.5f; }

VOCAB_KD_HD int raw_softmax_mode(const RowStats& st) {
  return !st.raw_softmax ? kRawIsQ : (raw_is_square(st.inv_t) ? kRawSquared : kRawExp);
}

// softmax(s) of one element from e_a = exp((s - s_max)/T) and q = e_a/sum; Raw = raw_softmax_mode(st), a
// template argument so loops over elements stay branch-free.
template <int Raw>
VOCAB_KD_HD float raw_softmax_as(float s, float e_a, float q, const RowStats& st) {
  if (Raw == kRawSquared) return e_a * e_a * st.inv_sum_s;
  if (Raw == kRawExp) return vocab_exp((s - st.s_max) - st.log_sum_s);
  return q;
}

// The student side of one element: a = (s - s_max)/T (log q + log_sum_a), e_a = exp(a), q = e_a/sum.
struct StudentTerm {
  float a;
  float e_a;
  float q;
};

VOCAB_KD_HD StudentTerm student_term(float s, const RowStats& st) {
  const float a = (s - st.s_max) * st.inv_t;
  const float e_a = vocab_exp(a);
  return {a, e_a, e_a * st.inv_sum_a};
}

// Both sides: b = (t - t_max)/T (log p + log_sum_b; -inf for a teacher logit dropped by top-k), e_b, p.
// q and p are exp(relative logit) / sum: the exps lose nothing to the rounding of the log sums.
struct ElementTerms {
  StudentTerm s;
  float b;
  float e_b;
  float p;
};

VOCAB_KD_HD ElementTerms element_terms(float s, float t, const RowStats& st) {
  const float b = (t - st.t_max) * st.inv_t;
  const float e_b = vocab_exp(b);
  return {student_term(s, st), b, e_b, e_b * st.inv_sum_b};
}

// One element of forward KL / soft CE.
template <int Raw>
VOCAB_KD_HD ElementOut element_grad_as(float s, float t, const RowStats& st) {
  const ElementTerms x = element_terms(s, t, st);
  const float log_q = x.s.a - st.log_sum_a, log_p = x.b - st.log_sum_b;
  const float kd_term = x.p > 0.0f ? x.p * (st.kind == kSoftCE ? -log_q : log_p - log_q) : 0.0f;
  return {st.kd_coef * (x.s.q - x.p) + st.mlm_coef * raw_softmax_as<Raw>(s, x.s.e_a, x.s.q, st), kd_term};
}

VOCAB_KD_HD ElementOut element_grad(float s, float t, const RowStats& st) {
  const int raw = raw_softmax_mode(st);
  return raw == kRawIsQ ? element_grad_as<kRawIsQ>(s, t, st)
         : raw == kRawSquared ? element_grad_as<kRawSquared>(s, t, st)
                              : element_grad_as<kRawExp>(s, t, st);
}

// Reverse KL pass 2: d loss / d s of one element (without the -mlm_coef at the label); k = sum q*delta from
// pass 1 (DivSum acc / sum), t_ref the teacher logit at s_max.
template <int Raw>
VOCAB_KD_HD float reverse_kl_grad_as(float s, float t, const RowStats& st, float k) {
  const StudentTerm x = student_term(s, st);
  const float delta = x.a - (t - st.t_ref) * st.inv_t;
  return st.kd_coef * x.q * (delta - k) + st.mlm_coef * raw_softmax_as<Raw>(s, x.e_a, x.q, st);
}

// reverse_kl_grad_as with the row's raw_softmax_mode picked per call (the CUDA kernel; CPU loops hoist it).
VOCAB_KD_HD float reverse_kl_grad(float s, float t, const RowStats& st, float k) {
  const int raw = raw_softmax_mode(st);
  return raw == kRawIsQ      ? reverse_kl_grad_as<kRawIsQ>(s, t, st, k)
         : raw == kRawSquared ? reverse_kl_grad_as<kRawSquared>(s, t, st, k)
                              : reverse_kl_grad_as<kRawExp>(s, t, st, k);
}

// JSD pass 2, one element: ``grad`` = kd_coef*w*q*delta + mlm_coef*softmax(s) (pass 3 subtracts k*``q_coef``),
// ``q_coef`` = kd_coef*w*q, and the row sums' terms q*delta and p*(log p - log m) (0 where p = 0).
struct JsdElement {
  float grad;
  float q_coef;
  float q_delta;
  float p_term;
};

template <int Raw>
VOCAB_KD_HD JsdElement jsd_element_as(float s, float t, const RowStats& st) {
  const ElementTerms x = element_terms(s, t, st);
  const JsdSoftplus sp = jsd_softplus(x.s.a, x.b, x.s.q, x.p, st);
  const float delta = st.sp_ref - sp.pos;
  const float log_p_over_m = -st.log_beta - sp.neg;  // -inf where p = 0
  const float q_coef = st.kd_coef * st.div_w * x.s.q;
  return {q_coef * delta + st.mlm_coef * raw_softmax_as<Raw>(s, x.s.e_a, x.s.q, st), q_coef, x.s.q * delta,
          x.p > 0.0f ? x.p * log_p_over_m : 0.0f};
}

VOCAB_KD_HD JsdElement jsd_element(float s, float t, const RowStats& st) {
  const int raw = raw_softmax_mode(st);
  return raw == kRawIsQ      ? jsd_element_as<kRawIsQ>(s, t, st)
         : raw == kRawSquared ? jsd_element_as<kRawSquared>(s, t, st)
                              : jsd_element_as<kRawExp>(s, t, st);
}

// After pass 2, from the row's sums of q*delta and p_term: its KD term and k = sum q*delta.
struct DivTotals {
  float kd;
  float k;
};

VOCAB_KD_HD DivTotals div_finish(const RowStats& st, float sum_q_delta, float sum_p_term) {
  if (st.kind == kReverseKL) {
    // R = D_r + k with D_r = log q_r - log p_r = -log_sum_a - ((t_ref - t_max)/T - log_sum_b).
    return {sum_q_delta - st.log_sum_a - (st.t_ref - st.t_max) * st.inv_t + st.log_sum_b, sum_q_delta};
  }
  return {st.beta * sum_p_term + st.div_w * ((-st.log_1m_beta - st.sp_ref) + sum_q_delta), sum_q_delta};
}

// MLM cross-entropy of the row: logsumexp(s) - s[y] = log_sum_s - (s[y] - s_max).
VOCAB_KD_HD float mlm_loss(const RowStats& st, float s_label) { return st.log_sum_s - (s_label - st.s_max); }

}  // namespace kdfast::vocab_kd
