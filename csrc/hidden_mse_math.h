// Hidden-state MSE: the per-element math shared by the CPU kernel (csrc/hidden_mse.cpp) and the
// CUDA kernel (kernels/hidden_mse.cu). One pass over a projected row y (or the raw student row)
// against the teacher row t gives the squared error and d loss / d y = grad_scale * (y - t).
#pragma once
#include "common.h"

namespace kdfast {

// (y - t)^2 in float64, so long sums of small errors keep their digits.
KDFAST_HD double hidden_mse_square(float y, float t) {
  const double diff = static_cast<double>(y) - static_cast<double>(t);
  return diff * diff;
}

// d loss / d y for one element; grad_scale = 2 / (kept rows * width).
KDFAST_HD float hidden_mse_grad(float y, float t, float grad_scale) { return grad_scale * (y - t); }

// Rows per deterministic partial sum: a fixed split, independent of the thread count.
constexpr index_t kHiddenMseChunk = 256;

}  // namespace kdfast
