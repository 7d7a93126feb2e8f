"""The ``cpu`` backend: autograd Functions over the C++/OpenMP kernels in ``kdfast._C``."""
