"""The chunked vocabulary-KD driver shared by every kernel backend (cpu, cuda, triton); the custom
ops of ``kdfast/ops/vocab.py`` run it with a :class:`VocabKDOptions`.

``fused_pass`` (op ``fused_linear_kd``): per chunk of C selected rows (rows with a label, or kept by
``mask``), the teacher and student logits [C, V] are computed in fp32 by torch matmuls, a backend *row
kernel* turns the student logits into d loss / d logits in place, and the gradients of the student
hidden states, weight and bias are accumulated in fp32. The op's backward only scales them
(``scale_stored_grads``). Extra memory is O(C x V) for the two logit chunks plus the fp32 gradients;
nothing [N, V] exists.

``kd_kl_pass`` (op ``kd_kl``): the same row kernel on given logits (no matmuls); its gradient buffer
is [N, V] like the input.

Modules, one job each: ``options`` (the pass's options), ``chunking`` (rows per chunk, chunk views),
``head`` (fp32 products of an LM head), ``selection`` (rows and their coefficients), ``teacher``
(filling the teacher chunk), ``gradients`` (accumulating and scaling the gradients), ``phases`` (the
benchmarks' phase hook), ``fused_pass``, ``logits_pass``, ``row_kernels`` (the contract below, native
adapters), ``support`` (inputs the kernel backends decline).

Row kernel contract (one function per backend, e.g. ``kdfast.cpu.fused_linear_kd.rows``)::

    rows(s, t, labels, kd_coef, mlm_coef, temperature, kind, beta) -> (kd_row, mlm_row)

- ``s`` [C, V] fp32 student logits, overwritten with
  ``kd_coef[r] * d kd_row / d a + mlm_coef[r] * (softmax(s) - onehot(labels[r]))``, a = s / T, where
  with ``q = softmax(a)``, ``p = softmax(t / T)`` and ``m = beta p + (1 - beta) q``:
  ``kl``, ``soft_ce``: ``d/da = q - p``; ``reverse_kl`` (KL(q || p)): ``q * ((log q - log p) - KL(q || p))``;
  ``jsd`` (beta KL(p || m) + (1 - beta) KL(q || m)): ``(1 - beta) * q * ((log q - log m) - KL(q || m))``;
- ``t`` [C, V] fp32 teacher logits with the strides of ``s`` (scratch: ``jsd`` overwrites it; -inf entries
  have p = 0: top-k, never with ``reverse_kl``);
- ``labels`` [C] int64, -1 means no MLM term for the row; ``kd_coef``, ``mlm_coef`` [C] fp32;
  ``kind`` one of ``kdfast._reduction.KINDS`` (the driver passes ``kd_term(kind, beta)``: ``jsd`` only
  with 0 < beta < 1); ``beta`` read by ``jsd``;
- returns ``kd_row`` [C] fp32, the row's divergence (``kind``), unscaled, and ``mlm_row`` [C] fp32,
  ``lse(s) - s[label]`` (0 for rows without a label).

Every kernel takes row-major ``s``, ``t`` (unit stride along V). A kernel with ``vocab_major = True``
also takes vocab-major ones (unit stride along C: ``s.t()`` is a contiguous [V, C]) and the fused
driver then fills its chunks that way, as ``W [V, H] @ x^T``: MKL computes that product faster than
``x @ W^T`` on CPU, and the gradient products read the transposed chunk as fast.
"""
from kdfast.functions.vocab_kd.chunking import (
    CPU_CHUNK_BYTES,
    CPU_MIN_CHUNK_ROWS,
    CUDA_CHUNK_BYTES,
    chunk_rows,
    rows_within,
)
from kdfast.functions.vocab_kd.fused_pass import fused_pass
from kdfast.functions.vocab_kd.gradients import scale_stored_grads
from kdfast.functions.vocab_kd.logits_pass import kd_kl_pass
from kdfast.functions.vocab_kd.options import VocabKDOptions
from kdfast.functions.vocab_kd.phases import phase_hook
from kdfast.functions.vocab_kd.row_kernels import RowKernel, fake_rows, pointer_row_kernel, row_kernel_outputs
from kdfast.functions.vocab_kd.support import fused_unsupported_reason, kd_kl_unsupported_reason, unsupported_reason

__all__ = [
    "CPU_CHUNK_BYTES", "CPU_MIN_CHUNK_ROWS", "CUDA_CHUNK_BYTES", "chunk_rows", "rows_within", "fused_pass",
    "scale_stored_grads", "kd_kl_pass", "VocabKDOptions", "phase_hook", "RowKernel", "fake_rows", "pointer_row_kernel",
    "row_kernel_outputs", "fused_unsupported_reason", "kd_kl_unsupported_reason", "unsupported_reason",
]
