// Python-side argument forms of the attention-KL kernels, shared by the kdfast._C and kdfast._cuda
// bindings: an operand is (data_ptr, storage, d, stride_b, stride_h, stride_l), a gradient
// target (data_ptr, stride_b, stride_h, stride_l); storage as attn::Storage.
#pragma once
#include <cstdint>
#include <tuple>

#include "attention_kl_math.h"

namespace kdfast::attn {

using OperandArgs = std::tuple<uintptr_t, int, int, index_t, index_t, index_t>;
using GradArgs = std::tuple<uintptr_t, index_t, index_t, index_t>;

inline OperandView operand_view(const OperandArgs& a) {
  return OperandView{reinterpret_cast<const void*>(std::get<0>(a)), std::get<1>(a), std::get<2>(a),
                     std::get<3>(a), std::get<4>(a), std::get<5>(a)};
}

inline GradView grad_view(const GradArgs& a) {
  return GradView{reinterpret_cast<float*>(std::get<0>(a)), std::get<1>(a), std::get<2>(a), std::get<3>(a)};
}

}  // namespace kdfast::attn
