"""The autograd Functions, one module per op, shared by the kernel backends (cpu, triton, cuda).

Layering: kernel (``csrc/``, ``kernels/``, ``kdfast/triton/``) -> autograd Function (here) ->
functional API (``kdfast/losses/``) -> ``nn.Module`` (``kdfast/losses/``). A backend module
(``kdfast/<backend>/<op>.py``) picks its kernel and hands it to the Function of its op.
"""
