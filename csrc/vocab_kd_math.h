// Arithmetic of one vocabulary-KD row, shared by the CPU kernel (csrc/vocab_kd.cpp) and the CUDA
// kernel (kernels/vocab_kd.cu), so the CPU tests execute the device math.
//
// For a row: s student logits, t teacher logits, T temperature, a = s/T, b = t/T,
// q = softmax(a), p = softmax(b), optional label y.
//   pass 1: online (max, sum) of exp for a, b and (when T != 1 and the row has a label) s;
//   pass 2: per element, grad = kd_coef*(q - p) + mlm_coef*(softmax(s) - onehot(y)) and the KD term
//           p*(log p - log q) (KL) or -p*log q (soft CE), summed into the row's loss.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstring>

#include "common.h"

namespace kdfast::vocab_kd {

// Below this exp() is subnormal in fp32; vocab_exp returns 0 there (also for -inf: top-k).
constexpr float kExpFloor = -87.0f;

KDFAST_HD float round_to_int(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  // Adding 1.5 * 2^23 rounds to an integer under IEEE round-to-nearest (|x| < 2^22 here) and,
  // unlike rintf, vectorises with any instruction set.
  const float magic = 12582912.0f;
  return (x + magic) - magic;
#endif
}

KDFAST_HD float bits_to_float(int32_t bits) {
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
KDFAST_HD float vocab_exp(float x) {
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

KDFAST_HD OnlineSum online_empty() { return {-FLT_MAX, 0.0f}; }

// Add one element. Branch-free (one exp either way), so a loop over independent states vectorises.
KDFAST_HD OnlineSum online_add(OnlineSum acc, float x, float scale) {
  const bool up = x > acc.max;
  const float e = vocab_exp((up ? acc.max - x : x - acc.max) * scale);
  return {up ? x : acc.max, up ? acc.sum * e + 1.0f : acc.sum + e};
}

// Combine two partial states (threads, warps, or a CPU block into its row).
KDFAST_HD OnlineSum online_merge(OnlineSum a, OnlineSum b, float scale) {
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
  float kd_coef;     // gradient coefficient of q - p
  float mlm_coef;    // gradient coefficient of softmax(s) - onehot(y)
  bool raw_softmax;  // softmax(s) differs from q (T != 1) and the row has an MLM term
  bool soft_ce;
};

// The row's statistics from its pass-1 states: a over s/T, b over t/T, raw over s (read only when
// raw_softmax: T != 1 and the row has a label).
KDFAST_HD RowStats row_stats(OnlineSum a, OnlineSum b, OnlineSum raw, float temperature, bool has_label,
                             float kd_coef, float mlm_coef, bool soft_ce) {
  RowStats st;
  st.inv_t = 1.0f / temperature;
  st.s_max = a.max;
  st.t_max = b.max;
  st.log_sum_a = logf(a.sum);
  st.log_sum_b = logf(b.sum);
  st.raw_softmax = has_label && temperature != 1.0f;
  st.log_sum_s = st.raw_softmax ? logf(raw.sum) : st.log_sum_a;
  st.kd_coef = kd_coef;
  st.mlm_coef = has_label ? mlm_coef : 0.0f;
  st.soft_ce = soft_ce;
  return st;
}

struct ElementOut {
  float grad;     // d loss / d s, without the -mlm_coef at the label
  float kd_term;  // this element's share of KL(p || q) or of the soft CE
};

KDFAST_HD ElementOut element_grad(float s, float t, const RowStats& st) {
  const float log_q = (s - st.s_max) * st.inv_t - st.log_sum_a;
  const float log_p = (t - st.t_max) * st.inv_t - st.log_sum_b;  // -inf for a teacher logit dropped by top-k
  const float q = vocab_exp(log_q);
  const float p = vocab_exp(log_p);
  const float softmax_s = st.raw_softmax ? vocab_exp((s - st.s_max) - st.log_sum_s) : q;
  const float kd_term = p > 0.0f ? p * (st.soft_ce ? -log_q : log_p - log_q) : 0.0f;
  return {st.kd_coef * (q - p) + st.mlm_coef * softmax_s, kd_term};
}

// MLM cross-entropy of the row: logsumexp(s) - s[y] = log_sum_s - (s[y] - s_max).
KDFAST_HD float mlm_loss(const RowStats& st, float s_label) { return st.log_sum_s - (s_label - st.s_max); }

}  // namespace kdfast::vocab_kd
