// pybind11 bindings of the attention-score MSE CUDA launcher (kernels/attention_mse.cuh).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "attention_mse.cuh"
#include "cuda/ops.h"

namespace kdfast::cuda {
namespace {

namespace py = pybind11;

void attention_mse_forward(std::uintptr_t q_s, std::array<int64_t, 4> q_s_stride, std::uintptr_t k_s,
                           std::array<int64_t, 4> k_s_stride, std::uintptr_t q_t, std::array<int64_t, 4> q_t_stride,
                           std::uintptr_t k_t, std::array<int64_t, 4> k_t_stride, std::uintptr_t key_mask,
                           std::array<int64_t, 2> mask_stride, std::array<int64_t, 5> sizes, double alpha_s,
                           double alpha_t, double grad_scale_q, double grad_scale_k, std::uintptr_t gram_q,
                           std::uintptr_t gram_k, std::uintptr_t head_energy, std::uintptr_t dq_s,
                           std::uintptr_t dk_s, std::uintptr_t stream) {
  const char* err;
  {
    py::gil_scoped_release release;
    err = attention_mse_launch({q_s, q_t, q_s_stride, q_t_stride}, {k_s, k_t, k_s_stride, k_t_stride}, key_mask,
                               mask_stride, sizes, alpha_s, alpha_t, grad_scale_q, grad_scale_k, gram_q, gram_k,
                               head_energy, dq_s, dk_s, stream);
  }
  if (err != nullptr) throw std::runtime_error(std::string("attention_mse_forward: ") + err);
}

}  // namespace

void register_attention_mse(pybind11::module_& m) {
  m.def("attention_mse_padded_width", &attention_mse_padded_width, "Gram workspace edge for n = d_s + d_t");
  m.def("attention_mse_forward", &attention_mse_forward,
        "TinyBERT score MSE by float64 Gram algebra on CUDA (see kernels/attention_mse.cuh).", py::arg("q_s"),
        py::arg("q_s_stride"), py::arg("k_s"), py::arg("k_s_stride"), py::arg("q_t"), py::arg("q_t_stride"),
        py::arg("k_t"), py::arg("k_t_stride"), py::arg("key_mask"), py::arg("mask_stride"), py::arg("sizes"),
        py::arg("alpha_s"), py::arg("alpha_t"), py::arg("grad_scale_q"), py::arg("grad_scale_k"), py::arg("gram_q"),
        py::arg("gram_k"), py::arg("head_energy"), py::arg("dq_s"), py::arg("dk_s"), py::arg("stream"));
}

}  // namespace kdfast::cuda
