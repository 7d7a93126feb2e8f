// CPU kernel of the hidden-state MSE: one pass over the (projected) student rows turns each row
// into its gradient, and returns the squared-error sum and the column sums of the gradient (the
// bias gradient). Partial sums are per fixed chunk of rows and reduced in order, so the result is
// bitwise reproducible. The projection matmuls themselves run in MKL through torch.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "hidden_mse_math.h"
#include "ops.h"

namespace kdfast {
namespace {

namespace py = pybind11;

// y [rows, width] (row stride y_ld) -> grad (row stride grad_ld; may alias y); masked rows get 0.
double hidden_mse_rows(std::uintptr_t y_ptr, index_t y_ld, std::uintptr_t t_ptr, index_t t_ld,
                       std::uintptr_t row_mask_ptr, index_t rows, index_t width, double grad_scale,
                       std::uintptr_t grad_ptr, index_t grad_ld, std::uintptr_t column_sum_ptr) {
  const float* y = reinterpret_cast<const float*>(y_ptr);
  const float* t = reinterpret_cast<const float*>(t_ptr);
  const uint8_t* keep = reinterpret_cast<const uint8_t*>(row_mask_ptr);
  float* grad = reinterpret_cast<float*>(grad_ptr);
  float* column_sum = reinterpret_cast<float*>(column_sum_ptr);
  const float scale = static_cast<float>(grad_scale);
  const index_t chunks = (rows + kHiddenMseChunk - 1) / kHiddenMseChunk;
  std::vector<double> loss_part(chunks, 0.0);
  std::vector<double> column_part(column_sum ? chunks * width : 0, 0.0);
  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(dynamic, 1)  // chunks are independent: balance busy cores
    for (index_t chunk = 0; chunk < chunks; ++chunk) {
      double loss = 0.0;
      double* columns = column_sum ? column_part.data() + chunk * width : nullptr;
      const index_t end = std::min(rows, (chunk + 1) * kHiddenMseChunk);
      for (index_t r = chunk * kHiddenMseChunk; r < end; ++r) {
        const float* yr = y + r * y_ld;
        const float* tr = t + r * t_ld;
        float* gr = grad + r * grad_ld;
        if (keep && !keep[r]) {
          for (index_t c = 0; c < width; ++c) gr[c] = 0.0f;
          continue;
        }
        for (index_t c = 0; c < width; ++c) {
          loss += hidden_mse_square(yr[c], tr[c]);
          gr[c] = hidden_mse_grad(yr[c], tr[c], scale);
          if (columns) columns[c] += gr[c];
        }
      }
      loss_part[chunk] = loss;
    }
  }
  double loss = 0.0;
  for (index_t chunk = 0; chunk < chunks; ++chunk) loss += loss_part[chunk];
  if (column_sum) {
    for (index_t c = 0; c < width; ++c) {
      double total = 0.0;
      for (index_t chunk = 0; chunk < chunks; ++chunk) total += column_part[chunk * width + c];
      column_sum[c] = static_cast<float>(total);
    }
  }
  return loss;
}

}  // namespace

void register_hidden_mse(pybind11::module_& m) {
  m.def("hidden_mse_rows", &hidden_mse_rows,
        "One pass over fp32 rows y [rows, width] against t: writes grad = grad_scale * (y - t) (0 on rows "
        "whose mask byte is 0; grad may alias y), optional column sums of grad; returns sum (y - t)^2.",
        py::arg("y"), py::arg("y_ld"), py::arg("t"), py::arg("t_ld"), py::arg("row_mask"), py::arg("rows"),
        py::arg("width"), py::arg("grad_scale"), py::arg("grad"), py::arg("grad_ld"), py::arg("column_sum"));
}

}  // namespace kdfast
