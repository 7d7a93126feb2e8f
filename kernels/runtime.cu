// Runtime helpers for kdfast._cuda (device count, last error), shared by all launchers.
#include <cuda_runtime.h>
#include "runtime.cuh"

namespace kdfast::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

const char* last_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace kdfast::cuda
