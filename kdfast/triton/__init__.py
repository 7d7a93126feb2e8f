"""The ``triton`` backend: Triton kernels (one module per op) and their autograd Functions.

Each kernel module lists its kernels in ``STATIC_COMPILE_SPECS`` (see ``kdfast.triton.static``)
so they are compiled for sm_80/sm_90 and checked for spills without a GPU.
"""
