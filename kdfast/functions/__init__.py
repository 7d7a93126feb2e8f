"""The drivers of the ops, one module (or package of one-job modules) per op, shared by the kernel
backends (cpu, triton, cuda): chunking, head matmuls, the kernel calls; no autograd.

Layering: kernel (``csrc/``, ``kernels/``, ``kdfast/triton/``) -> driver (here) -> custom op with its
autograd formula (``kdfast/ops/``) -> backend module (``kdfast/<backend>/<op>.py``) -> functional API and
``nn.Module`` (``kdfast/losses/``).
"""
