// kdfast._cuda bindings of the vocabulary-KD row kernel (kernels/vocab_kd.cu); raw pointers, stream as uintptr_t.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/ops.h"
#include "vocab_kd.cuh"

namespace kdfast::cuda {

void register_vocab_kd(pybind11::module_& m) {
  m.def(
      "vocab_kd_rows",
      [](std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, std::uintptr_t kd_coef, std::uintptr_t mlm_coef,
         std::uintptr_t kd_row, std::uintptr_t mlm_row, int64_t rows, int64_t vocab, int64_t ld, float temperature,
         int kind, float beta, std::uintptr_t stream) {
        const char* err = vocab_kd_rows(reinterpret_cast<float*>(s), reinterpret_cast<float*>(t),
                                        reinterpret_cast<const int64_t*>(labels),
                                        reinterpret_cast<const float*>(kd_coef),
                                        reinterpret_cast<const float*>(mlm_coef), reinterpret_cast<float*>(kd_row),
                                        reinterpret_cast<float*>(mlm_row), rows, vocab, ld, temperature, kind,
                                        beta, stream);
        if (err != nullptr) throw std::runtime_error(std::string("kdfast vocab_kd_rows: ") + err);
      },
      "Vocabulary-KD row kernel, in place on fp32 student logits (see kdfast/functions/vocab_kd.py)",
      pybind11::arg("s"), pybind11::arg("t"), pybind11::arg("labels"), pybind11::arg("kd_coef"),
      pybind11::arg("mlm_coef"), pybind11::arg("kd_row"), pybind11::arg("mlm_row"), pybind11::arg("rows"),
      pybind11::arg("vocab"), pybind11::arg("ld"), pybind11::arg("temperature"), pybind11::arg("kind"),
      pybind11::arg("beta"), pybind11::arg("stream"));
}

}  // namespace kdfast::cuda
