"""The ``triton`` backend: Triton kernels (one module per op), each launched by a ``torch.library.triton_op``
(:data:`TRITON_OPS`) that the op's backend functions call.

Each kernel module lists its kernels in ``STATIC_COMPILE_SPECS`` (see ``kdfast.triton.static``)
so they are compiled for sm_80/sm_90 and checked for spills without a GPU.
"""

# The kernels' torch.library.triton_op launchers, registered when their modules import.
TRITON_OPS = ("kdfast::vocab_kd_rows_triton", "kdfast::attention_kl_rows_triton",
              "kdfast::attention_kl_rows_backward_triton", "kdfast::attention_mse_gram_triton",
              "kdfast::hidden_mse_rows_triton")
