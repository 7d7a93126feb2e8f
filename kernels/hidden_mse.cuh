// Launch-side API of the hidden-state MSE row kernel on CUDA; plain C++ only.
#pragma once
#include <cstdint>

namespace kdfast::cuda {

// One pass over fp32 rows y [rows, width] (row stride y_ld) against t: grad = grad_scale (y - t)
// (0 where row_mask[r] == 0; grad may alias y), per-chunk partials of sum (y - t)^2 into loss_part
// (float64 [chunks, column blocks]) and, when column_part != 0, of the column sums of grad (fp32
// [chunks, width]). chunks = ceil(rows / hidden_mse_chunk_rows()), column blocks = ceil(width / 64).
const char* hidden_mse_rows_launch(std::uintptr_t y, int64_t y_ld, std::uintptr_t t, int64_t t_ld,
                                   std::uintptr_t row_mask, int64_t rows, int64_t width, double grad_scale,
                                   std::uintptr_t grad, int64_t grad_ld, std::uintptr_t loss_part,
                                   std::uintptr_t column_part, std::uintptr_t stream);

int64_t hidden_mse_chunk_rows();
int64_t hidden_mse_column_block();

}  // namespace kdfast::cuda
