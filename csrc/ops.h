// One registration function per op; each lives in csrc/<op>.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace kdfast {
void register_vocab_kd(pybind11::module_& m);
void register_attention_kl(pybind11::module_& m);
void register_attention_mse(pybind11::module_& m);
void register_hidden_mse(pybind11::module_& m);
}  // namespace kdfast
