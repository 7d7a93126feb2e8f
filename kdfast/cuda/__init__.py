"""The ``cuda`` backend: autograd Functions over the CUDA kernels in ``kdfast._cuda``."""
