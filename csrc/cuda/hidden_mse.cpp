// pybind11 bindings of the hidden-state MSE CUDA row kernel (kernels/hidden_mse.cuh).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda/ops.h"
#include "hidden_mse.cuh"

namespace kdfast::cuda {
namespace {

namespace py = pybind11;

void hidden_mse_rows(std::uintptr_t y, int64_t y_ld, std::uintptr_t t, int64_t t_ld, std::uintptr_t row_mask,
                     int64_t rows, int64_t width, double grad_scale, std::uintptr_t grad, int64_t grad_ld,
                     std::uintptr_t loss_part, std::uintptr_t column_part, std::uintptr_t stream) {
  const char* err;
  {
    py::gil_scoped_release release;
    err = hidden_mse_rows_launch(y, y_ld, t, t_ld, row_mask, rows, width, grad_scale, grad, grad_ld, loss_part,
                                 column_part, stream);
  }
  if (err != nullptr) throw std::runtime_error(std::string("hidden_mse_rows: ") + err);
}

}  // namespace

void register_hidden_mse(pybind11::module_& m) {
  m.def("hidden_mse_chunk_rows", &hidden_mse_chunk_rows, "rows per partial sum");
  m.def("hidden_mse_column_block", &hidden_mse_column_block, "columns per partial sum");
  m.def("hidden_mse_rows", &hidden_mse_rows, "fused hidden-MSE row pass on CUDA (see kernels/hidden_mse.cuh)",
        py::arg("y"), py::arg("y_ld"), py::arg("t"), py::arg("t_ld"), py::arg("row_mask"), py::arg("rows"),
        py::arg("width"), py::arg("grad_scale"), py::arg("grad"), py::arg("grad_ld"), py::arg("loss_part"),
        py::arg("column_part"), py::arg("stream"));
}

}  // namespace kdfast::cuda
