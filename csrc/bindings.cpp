// kdfast._C: CPU kernels on raw pointers (no libtorch). Each op registers itself.
#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "kdfast CPU kernels (C++17, OpenMP)";
  m.def("num_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  kdfast::register_vocab_kd(m);
  kdfast::register_attention_kl(m);
  kdfast::register_attention_mse(m);
  kdfast::register_hidden_mse(m);
}
