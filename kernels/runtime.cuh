// Launch-side API of kdfast._cuda: plain C++ types only, so csrc/cuda/*.cpp compile
// with the host compiler and no CUDA headers. Streams travel as uintptr_t.
#pragma once
#include <cstdint>

namespace kdfast::cuda {
int device_count();
// nullptr when the last launch succeeded, else CUDA's message.
const char* last_error();
}  // namespace kdfast::cuda
