// Launcher of the CUDA vocabulary-KD row kernel (kernels/vocab_kd.cu): plain C++ types, so the
// pybind11 bindings (csrc/cuda/vocab_kd.cpp) compile without CUDA headers.
#pragma once
#include <cstdint>

namespace kdfast::cuda {

// In place on fp32 student logits s [rows, vocab] (rows ld elements apart); t likewise (JSD: scratch).
// labels [rows] int64 (-1: no MLM term), kd_coef / mlm_coef [rows] fp32; writes kd_row / mlm_row [rows].
// kind: vocab_kd::Kind (0 KL, 1 soft CE, 2 reverse KL, 3 JSD with 0 < beta < 1).
// Row kernel contract: kdfast/functions/vocab_kd.py. Returns nullptr, or CUDA's error message.
const char* vocab_kd_rows(float* s, float* t, const int64_t* labels, const float* kd_coef,
                          const float* mlm_coef, float* kd_row, float* mlm_row, int64_t rows, int64_t vocab,
                          int64_t ld, float temperature, int kind, float beta, std::uintptr_t stream);

}  // namespace kdfast::cuda
