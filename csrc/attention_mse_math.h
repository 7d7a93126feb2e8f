// TinyBERT attention-score MSE by Gram algebra: the per-element math shared by the CPU kernel
// (csrc/attention_mse.cpp) and the CUDA kernels (kernels/attention_mse.cu).
//
// Per (batch, head) the two sides are concatenated column-wise into L x n operands, n = d_s + d_t:
//   X = [ alpha_s Q_s | -alpha_t Q_t ],   Y = [ K_s | K_t ]  (masked key rows of Y are 0),
// so the score difference is D = X Y^T and E = ||D||_F^2 = <X^T X, Y^T Y>. Gradients:
//   dE/dQ_s = 2 alpha_s (X (Y^T Y))[:, :d_s],   dE/dK_s = 2 (Y (X^T X))[:, :d_s].
// Everything after the fp32 load is float64: E is a difference of large terms when the student is
// close to the teacher, and fp32 products of fp32 inputs are exact in float64.
#pragma once
#include "common.h"

namespace kdfast {

// Column c of a concatenated operand row: student value (c < d_s), teacher value (c < d_s + d_t)
// or the zero padding beyond. `student` and `teacher` point at the row; strides are in elements.
KDFAST_HD double mse_operand(const float* student, index_t student_stride, const float* teacher,
                             index_t teacher_stride, index_t c, index_t d_s, index_t d_t,
                             double student_scale, double teacher_scale) {
  if (c < d_s) return student_scale * static_cast<double>(student[c * student_stride]);
  if (c < d_s + d_t) return teacher_scale * static_cast<double>(teacher[(c - d_s) * teacher_stride]);
  return 0.0;
}

// Contribution of Gram entry (i, j), j >= i, to <GQ, GK>: off-diagonal entries stand for two.
KDFAST_HD double mse_gram_pair(double gq, double gk, bool off_diagonal) {
  return (off_diagonal ? 2.0 : 1.0) * gq * gk;
}

// One concatenated operand (X: Q sides, scales a_s and -a_t, no mask; Y: K sides, scales 1, key mask).
struct MseOperand {
  const float* student;
  const float* teacher;
  index_t s_stride[4];  // [b, h, l, c] element strides
  index_t t_stride[4];
  double s_scale, t_scale;
  const uint8_t* mask;  // [B, L] keep flags, or nullptr
  index_t mask_b, mask_l;
};

// Entry (l, c) of the operand of head (b, h) as float64: 0 for padding rows (l >= L) and masked keys.
KDFAST_HD double mse_operand_at(const MseOperand& p, index_t b, index_t h, index_t l, index_t c, index_t length,
                                index_t d_s, index_t d_t) {
  if (l >= length || (p.mask != nullptr && !p.mask[b * p.mask_b + l * p.mask_l])) return 0.0;
  return mse_operand(p.student + b * p.s_stride[0] + h * p.s_stride[1] + l * p.s_stride[2], p.s_stride[3],
                     p.teacher + b * p.t_stride[0] + h * p.t_stride[1] + l * p.t_stride[2], p.t_stride[3], c, d_s,
                     d_t, p.s_scale, p.t_scale);
}

}  // namespace kdfast
