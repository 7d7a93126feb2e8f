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

}  // namespace kdfast
