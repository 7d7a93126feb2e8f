// Shared by host C++ (csrc/*.cpp) and CUDA device code (kernels/*.cu).
// Keep device math in KDFAST_HD functions so the CPU kernels execute it in tests.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define KDFAST_HD __host__ __device__ __forceinline__
#else
#define KDFAST_HD inline
#endif

namespace kdfast {

// Strides are in elements, as torch reports them.
using index_t = int64_t;

}  // namespace kdfast
