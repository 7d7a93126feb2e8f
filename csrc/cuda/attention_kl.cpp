// kdfast._cuda bindings of the attention-KL kernels (kernels/attention_kl.cu); same argument
// forms as the CPU kernel in kdfast._C plus the stream handle.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "attention_kl.cuh"
#include "attention_kl_args.h"
#include "cuda/ops.h"

namespace kdfast::cuda {
namespace {

namespace py = pybind11;
using attn::GradArgs;
using attn::OperandArgs;

void check(const char* error) {
  if (error != nullptr) throw std::runtime_error(std::string("attention_kl CUDA launch failed: ") + error);
}

void forward(const OperandArgs& q_s, const OperandArgs& k_s, const OperandArgs& q_t, const OperandArgs& k_t,
             bool same_qk, uintptr_t key_mask, int64_t batch, int64_t heads, int64_t length, uintptr_t kl_rows,
             uintptr_t lse_s, uintptr_t lse_t, uintptr_t stream) {
  (void)same_qk;  // the forward reads k_s whatever it aliases
  check(attention_kl_forward(attn::operand_view(q_s), attn::operand_view(k_s), attn::operand_view(q_t),
                             attn::operand_view(k_t), reinterpret_cast<const bool*>(key_mask), batch, heads, length,
                             reinterpret_cast<float*>(kl_rows), reinterpret_cast<float*>(lse_s),
                             reinterpret_cast<float*>(lse_t), stream));
}

void backward(const OperandArgs& q_s, const OperandArgs& k_s, const OperandArgs& q_t, const OperandArgs& k_t,
              bool same_qk, uintptr_t key_mask, int64_t batch, int64_t heads, int64_t length, uintptr_t lse_s,
              uintptr_t lse_t, float coef, const GradArgs& dq, const GradArgs& dk, uintptr_t stream) {
  check(attention_kl_backward(attn::operand_view(q_s), attn::operand_view(k_s), attn::operand_view(q_t),
                              attn::operand_view(k_t), same_qk, reinterpret_cast<const bool*>(key_mask), batch,
                              heads, length, reinterpret_cast<const float*>(lse_s),
                              reinterpret_cast<const float*>(lse_t), coef, attn::grad_view(dq), attn::grad_view(dk),
                              stream));
}

}  // namespace

void register_attention_kl(pybind11::module_& m) {
  m.def("attention_kl_forward", &forward, "KL rows and both log-sum-exps [B, heads, L] (fp32) on a CUDA stream",
        py::arg("q_s"), py::arg("k_s"), py::arg("q_t"), py::arg("k_t"), py::arg("same_qk"), py::arg("key_mask"),
        py::arg("batch"), py::arg("heads"), py::arg("length"), py::arg("kl_rows"), py::arg("lse_s"),
        py::arg("lse_t"), py::arg("stream"));
  m.def("attention_kl_backward", &backward, "fp32 gradients into dq and dk on a CUDA stream", py::arg("q_s"),
        py::arg("k_s"), py::arg("q_t"), py::arg("k_t"), py::arg("same_qk"), py::arg("key_mask"), py::arg("batch"),
        py::arg("heads"), py::arg("length"), py::arg("lse_s"), py::arg("lse_t"), py::arg("coef"), py::arg("dq"),
        py::arg("dk"), py::arg("stream"));
}

}  // namespace kdfast::cuda
