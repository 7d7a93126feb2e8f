// Arithmetic of the two-operand attention KL, shared by the CPU kernel (csrc/attention_kl.cpp)
// and the CUDA kernels (kernels/attention_kl.cu), so the CPU tests execute the device math.
//
// One query row i of scores s_ij (student) and t_ij (teacher) over its valid keys j:
//   KL_i = sum_j p_t(ij) (t_ij - s_ij) - lse_t(i) + lse_s(i),   p_t = softmax_j(t_i.)
// kept online as (m_s, l_s), (m_t, l_t) and acc = sum_j exp(t_ij - m_t) (t_ij - s_ij);
// the gradient of the row with respect to s_ij is p_s(ij) - p_t(ij).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace kdfast::attn {

// exp(x) in fp32. On the device the hardware __expf; on the host a branch-free Cody-Waite
// reduction with a degree-7 Taylor polynomial (about 1 ulp), so the row loops vectorise.
// Arguments below -87 give a tiny normal number instead of 0 (callers never rely on exact 0).
KDFAST_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // not fminf/fmaxf: those stay libm calls
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = fmaf(n, -0.693145751953125f, x);   // ln 2, high part (exact product)
  r = fmaf(n, -1.428606765330187e-06f, r);     // ln 2, low part
  float p = 1.0f / 5040.0f;
  p = fmaf(p, r, 1.0f / 720.0f);
  p = fmaf(p, r, 1.0f / 120.0f);
  p = fmaf(p, r, 1.0f / 24.0f);
  p = fmaf(p, r, 1.0f / 6.0f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

// Running state of one query row (or of one thread's share of its keys).
struct KlRow {
  float m_s, l_s;  // student max and sum exp(s - m_s)
  float m_t, l_t;  // teacher max and sum exp(t - m_t)
  float acc;       // sum exp(t - m_t) * (t - s)
};

KDFAST_HD KlRow kl_row_empty() { return KlRow{-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f}; }

// Raise the maxima to cover a block whose maxima are (max_s, max_t), rescaling the sums.
KDFAST_HD void kl_row_raise(KlRow& row, float max_s, float max_t) {
  if (max_s > row.m_s) {
    row.l_s = row.l_s > 0.0f ? row.l_s * fast_exp(row.m_s - max_s) : 0.0f;
    row.m_s = max_s;
  }
  if (max_t > row.m_t) {
    float c = row.l_t > 0.0f ? fast_exp(row.m_t - max_t) : 0.0f;
    row.l_t *= c;
    row.acc *= c;
    row.m_t = max_t;
  }
}

// The three summands of one key under the current maxima (m_s, m_t).
KDFAST_HD void kl_key_terms(float s, float t, float m_s, float m_t, float& e_s, float& e_t, float& e_t_gap) {
  e_s = fast_exp(s - m_s);
  e_t = fast_exp(t - m_t);
  e_t_gap = e_t * (t - s);
}

// Add a block's sums, taken under the row's current maxima (after kl_row_raise).
KDFAST_HD void kl_row_add(KlRow& row, float sum_e_s, float sum_e_t, float sum_e_t_gap) {
  row.l_s += sum_e_s;
  row.l_t += sum_e_t;
  row.acc += sum_e_t_gap;
}

// One key at a time: raise, then add.
KDFAST_HD void kl_row_push(KlRow& row, float s, float t) {
  kl_row_raise(row, s, t);
  float e_s, e_t, e_t_gap;
  kl_key_terms(s, t, row.m_s, row.m_t, e_s, e_t, e_t_gap);
  kl_row_add(row, e_s, e_t, e_t_gap);
}

// Combine two states over disjoint key sets (threads sharing a row).
KDFAST_HD KlRow kl_row_merge(KlRow a, const KlRow& b) {
  kl_row_raise(a, b.m_s, b.m_t);
  float c_s = b.l_s > 0.0f ? fast_exp(b.m_s - a.m_s) : 0.0f;
  float c_t = b.l_t > 0.0f ? fast_exp(b.m_t - a.m_t) : 0.0f;
  kl_row_add(a, b.l_s * c_s, b.l_t * c_t, b.acc * c_t);
  return a;
}

// KL of the finished row; writes both log-sum-exps (kept for the backward).
// The maxima and logs are differenced separately to limit cancellation.
KDFAST_HD float kl_row_finish(const KlRow& row, float& lse_s, float& lse_t) {
  float log_l_s = logf(row.l_s), log_l_t = logf(row.l_t);
  lse_s = row.m_s + log_l_s;
  lse_t = row.m_t + log_l_t;
  return row.acc / row.l_t - (row.m_t - row.m_s) - (log_l_t - log_l_s);
}

// d loss / d s_ij = coef * (p_s - p_t), both recomputed from the stored log-sum-exps.
KDFAST_HD float kl_score_grad(float s, float t, float lse_s, float lse_t, float coef) {
  return coef * (fast_exp(s - lse_s) - fast_exp(t - lse_t));
}

// Storage of the inputs: fp32, bf16 or fp16 (16-bit ones as raw bits), read as fp32.
enum Storage : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

KDFAST_HD float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

KDFAST_HD float fp16_to_float(uint16_t bits) {
  uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    float f = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    std::memcpy(&u, &f, sizeof(u));
    u |= sign;
  } else if (exponent == 31) {
    u = sign | 0x7f800000u | (mantissa << 13);
  } else {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Element i of a buffer of the given storage, as fp32.
KDFAST_HD float load_as_float(const void* base, int storage, index_t i) {
  if (storage == kFloat32) return static_cast<const float*>(base)[i];
  uint16_t bits = static_cast<const uint16_t*>(base)[i];
  return storage == kBFloat16 ? bf16_to_float(bits) : fp16_to_float(bits);
}

// One [B, heads, L, d] input (d contiguous, any storage); strides in elements.
struct OperandView {
  const void* ptr;
  int storage;
  int d;
  index_t sb, sh, sl;
  KDFAST_HD index_t offset(index_t b, index_t h, index_t l) const { return b * sb + h * sh + l * sl; }
  KDFAST_HD float load(index_t b, index_t h, index_t l, int c) const {
    return load_as_float(ptr, storage, offset(b, h, l) + c);
  }
};

// A writable fp32 [B, heads, L, d] gradient (d contiguous).
struct GradView {
  float* ptr;
  index_t sb, sh, sl;
  KDFAST_HD float* row(index_t b, index_t h, index_t l) const { return ptr + b * sb + h * sh + l * sl; }
};

}  // namespace kdfast::attn
