// kdfast._cuda: host-side bindings compiled by the host compiler; the kernels come from
// kernels/*.cu compiled by nvcc and linked with -cudart static. No libtorch.
#include "cuda/ops.h"
#include "runtime.cuh"

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kdfast CUDA kernels (sm_80/86/90 + PTX)";
  m.def("device_count", &kdfast::cuda::device_count, "visible CUDA devices (0 without a driver)");
  kdfast::cuda::register_vocab_kd(m);
  kdfast::cuda::register_attention_kl(m);
  kdfast::cuda::register_attention_mse(m);
  kdfast::cuda::register_hidden_mse(m);
}
