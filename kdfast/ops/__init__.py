"""The kernels as ``torch.library`` custom ops (namespace ``kdfast``), so ``torch.compile``,
``torch.export`` and FakeTensor tracing see them as single nodes with known output shapes.

Two levels:

- loss ops (``kdfast::fused_linear_kd``, ``kd_kl``, ``attention_kl``, ``relation_kl``,
  ``attention_score_mse``, ``hidden_mse``): one chunked driver pass (``kdfast/functions/``) on the
  kernel backend named by their ``backend`` argument (``cpu``, ``cuda``, ``triton``), each with a
  fake implementation and a registered autograd formula; the kernel backends' public functions
  call them;
- kernel ops: the native vocabulary-KD row kernel (``kdfast::vocab_kd_rows``, CPU and CUDA
  implementations, ``kdfast.ops.kernels``) and the Triton one as ``torch.library.triton_op`` with
  ``wrap_triton`` (``kdfast::vocab_kd_rows_triton``, ``kdfast/triton/vocab_kd.py``, registered where
  triton imports).

:data:`OPS` lists every op for ``torch.library.opcheck`` (tests/test_ops.py).
"""
from __future__ import annotations

from kdfast.ops import attention, hidden, kernels, vocab

OPS = (*vocab.OPS, *attention.OPS, *hidden.OPS, *kernels.OPS)

__all__ = ["OPS", "attention", "hidden", "kernels", "vocab"]
