// One registration function per op for kdfast._cuda; each lives in csrc/cuda/<op>.cpp
// and calls launchers declared in kernels/<op>.cuh (plain C++ types, stream as uintptr_t).
#pragma once
#include <pybind11/pybind11.h>

namespace kdfast::cuda {
void register_vocab_kd(pybind11::module_& m);
void register_attention_kl(pybind11::module_& m);
void register_attention_mse(pybind11::module_& m);
void register_hidden_mse(pybind11::module_& m);
}  // namespace kdfast::cuda
