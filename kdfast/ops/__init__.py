"""The kernels as ``torch.library`` custom ops (namespace ``kdfast``), so ``torch.compile``,
``torch.export`` and FakeTensor tracing see them as single nodes with known output shapes.

Two levels:

- loss ops (``kdfast::fused_linear_kd``, ``kd_kl``, ``attention_kl``, ``relation_kl``,
  ``attention_score_mse``, ``hidden_mse``): one chunked driver pass (``kdfast/functions/``) on the
  kernel backend named by their ``backend`` argument (``cpu``, ``cuda``, ``triton``), each with a
  fake implementation and a registered autograd formula; the kernel backends' public functions
  call them;
- kernel ops, one per native entry point, tensors in and out, each with a fake implementation and no
  autograd formula (they are the forward and backward pieces that the loss ops' formulas call):
  the C++ (CPU) and CUDA kernels as ``custom_op`` with a CPU and a CUDA implementation
  (``kdfast::vocab_kd_rows``, ``kdfast.ops.kernels``; ``attention_kl_rows``, ``attention_kl_rows_backward``,
  ``attention_mse_gram``, ``kdfast.ops.attention_kernels``; ``hidden_mse_rows``, ``kdfast.ops.hidden_kernels``),
  and the Triton kernels as ``torch.library.triton_op`` with ``wrap_triton`` launches (``kdfast::<name>_triton``
  in ``kdfast/triton/vocab_kd.py``, ``attention_kl.py``, ``attention_score_mse.py``, ``hidden_mse.py``,
  registered where triton imports; :data:`kdfast.triton.TRITON_OPS`).

:data:`OPS` lists every op but the Triton ones for ``torch.library.opcheck`` (tests/test_ops.py).
"""
from __future__ import annotations

from kdfast.ops import attention, attention_kernels, hidden, hidden_kernels, kernels, vocab

OPS = (*vocab.OPS, *attention.OPS, *hidden.OPS, *kernels.OPS, *attention_kernels.OPS, *hidden_kernels.OPS)

__all__ = ["OPS", "attention", "attention_kernels", "hidden", "hidden_kernels", "kernels", "vocab"]
