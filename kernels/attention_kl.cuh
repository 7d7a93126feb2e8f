// Launch-side API of the attention-KL CUDA kernels (plain C++ types; stream as uintptr_t).
// Operands and gradient targets as in csrc/attention_kl_math.h. Each launcher returns nullptr
// on success, else CUDA's error message.
#pragma once
#include <cstdint>

#include "attention_kl_math.h"

namespace kdfast::cuda {

// kl_rows, lse_s, lse_t: fp32 [B, heads, L] contiguous; masked query rows get 0.
const char* attention_kl_forward(attn::OperandView q_s, attn::OperandView k_s, attn::OperandView q_t,
                                 attn::OperandView k_t, const bool* key_mask, int64_t batch, int64_t heads,
                                 int64_t length, float* kl_rows, float* lse_s, float* lse_t, uintptr_t stream);

// dq = coef * a_s dS K_s and dk = coef * a_s dS^T Q_s (fp32); with same_qk they are one buffer and sum.
const char* attention_kl_backward(attn::OperandView q_s, attn::OperandView k_s, attn::OperandView q_t,
                                  attn::OperandView k_t, bool same_qk, const bool* key_mask, int64_t batch,
                                  int64_t heads, int64_t length, const float* lse_s, const float* lse_t,
                                  float coef, attn::GradView dq, attn::GradView dk, uintptr_t stream);

}  // namespace kdfast::cuda
