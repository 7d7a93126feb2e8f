// Launch-side API of the TinyBERT attention-score MSE (Gram algebra) CUDA kernels; plain C++ only.
#pragma once
#include <array>
#include <cstdint>

namespace kdfast::cuda {

// One side pair as the host sees it: fp32 device pointers and [b, h, l, c] element strides.
struct AttentionMseSide {
  std::uintptr_t student, teacher;
  std::array<int64_t, 4> s_stride, t_stride;
};

// Per (batch, head): GQ = X^T X and GK = Y^T Y into the float64 workspaces gram_q, gram_k
// [B*h, n_pad, n_pad] (n_pad = attention_mse_padded_width(d_s + d_t)), head_energy[bh] = <GQ, GK>,
// and, when dq_s/dk_s are non-zero, dQ_s = grad_scale_q X GK[:, :d_s], dK_s = grad_scale_k Y GQ[:, :d_s]
// as contiguous fp32 [B, h, L, d_s]. key_mask: uint8 [B, L] with strides, or 0 for none.
// Returns nullptr on success, else CUDA's message.
const char* attention_mse_launch(const AttentionMseSide& q, const AttentionMseSide& k, std::uintptr_t key_mask,
                                 std::array<int64_t, 2> mask_stride, std::array<int64_t, 5> sizes, double alpha_s,
                                 double alpha_t, double grad_scale_q, double grad_scale_k, std::uintptr_t gram_q,
                                 std::uintptr_t gram_k, std::uintptr_t head_energy, std::uintptr_t dq_s,
                                 std::uintptr_t dk_s, std::uintptr_t stream);

int64_t attention_mse_padded_width(int64_t n);

}  // namespace kdfast::cuda
