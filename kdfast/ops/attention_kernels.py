"""The native attention kernels as custom ops: the C++/OpenMP kernels of ``kdfast._C`` for CPU tensors and
the CUDA kernels of ``kdfast._cuda`` for CUDA tensors, tensors in and tensors out (the pointers stay here).

- ``kdfast::attention_kl_rows(q_s, k_s, q_t, k_t, key_mask) -> (kl_rows, lse_s, lse_t)``: per query row of
  each (batch, head), KL(p_t || p_s) and the two log-sum-exps, fp32 [B, h, L] (0 on rows without a key);
- ``kdfast::attention_kl_rows_backward(q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, coef) -> (dq, dk)``:
  ``coef`` times the gradients of the summed row KLs, fp32 contiguous (k = q: dq + dk with the strides of
  q_s where those are dense, so relation heads get a head view of a [B, L, H] buffer);
- ``kdfast::attention_mse_gram(q_s, k_s, q_t, k_t, key_mask, alpha_s, alpha_t, grad_scale_q, grad_scale_k,
  with_grad) -> (head_energy, dq_s, dk_s)``: the kernel contract of ``kdfast/functions/attention_score_mse.py``.

Shapes: q_s, k_s [B, h, L, d_s], q_t, k_t [B, h, L, d_t] (fp32, bf16 or fp16; any strides, a non-unit last
stride is copied), key_mask bool [B, L] (True = real token). ``k_s``, ``k_t`` None mean k = q (relation KL:
one gradient, dq + dk, and a [0] tensor for dk). Gradients not asked for are [0] fp32 tensors.
The ops are the forward and backward pieces of the loss ops ``kdfast::attention_kl``, ``relation_kl`` and
``attention_score_mse`` (``kdfast/ops/attention.py``), whose registered autograd formulas call them; they
have no autograd formula of their own (not differentiable). The drivers call the functions
:func:`attention_kl_rows`, :func:`attention_kl_rows_backward` and :func:`attention_mse_gram`, the ops'
implementations for the inputs' device, directly: they run inside the loss ops (below autograd, never
traced), where a second dispatch would add ~80 us of Python per call.
"""
from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from kdfast import _ext
from kdfast._buffers import new_output, new_output_like
from kdfast.ops._library import custom_op

OPS = ("kdfast::attention_kl_rows", "kdfast::attention_kl_rows_backward", "kdfast::attention_mse_gram")
STORAGE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' attn::Storage codes


def _extension(device: torch.device) -> tuple[ModuleType, tuple]:
    """The extension for ``device`` and its trailing launch arguments (the current stream's handle on CUDA)."""
    if device.type == "cuda":
        return _ext.require_cuda(), (torch.cuda.current_stream(device).cuda_stream,)
    return _ext.require_cpu(), ()


def _on(device: torch.device):
    """Launch context: the CUDA device of the tensors (nothing on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _last_dim_contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    return x if x is None or x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def keys_are_queries(k_s: Optional[Tensor], k_t: Optional[Tensor]) -> bool:
    """Whether k = q (``k_s``, ``k_t`` both None); one of them None is an error."""
    if (k_s is None) != (k_t is None):
        raise ValueError(f"k_s, k_t: expected both tensors or both None (k = q), got {type(k_s).__name__} and "
                         f"{type(k_t).__name__}")
    return k_s is None


def _operand(x: Tensor) -> tuple:
    """The kernels' operand form (data_ptr, storage, d, stride_b, stride_h, stride_l)."""
    return (x.data_ptr(), STORAGE[x.dtype], x.shape[-1], x.stride(0), x.stride(1), x.stride(2))


def _grad_target(x: Tensor) -> tuple:
    return (x.data_ptr(), x.stride(0), x.stride(1), x.stride(2))


def _kl_inputs(q_s, k_s, q_t, k_t, key_mask) -> tuple:
    """The four kernel operands with unit last stride (k = q when k_s is None) and the mask contiguous: the
    tensors whose pointers the kernels read, kept alive by the caller until the launch returns."""
    q_s, q_t = _last_dim_contiguous(q_s), _last_dim_contiguous(q_t)
    k_s = q_s if k_s is None else _last_dim_contiguous(k_s)
    k_t = q_t if k_t is None else _last_dim_contiguous(k_t)
    return q_s, k_s, q_t, k_t, None if key_mask is None else key_mask.contiguous()


def _kl_launch_args(inputs: tuple, same_qk: bool) -> tuple:
    """The operands' forms, ``same_qk`` and the mask pointer, as the kernels' launchers take them."""
    *operands, mask = inputs
    return (*(_operand(x) for x in operands), same_qk, 0 if mask is None else mask.data_ptr())


# --------------------------------------------------------------------------- attention KL rows


def _row_stats(q_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """kl_rows, lse_s, lse_t: fp32 [B, h, L] each."""
    return tuple(new_output(q_s.shape[:3], torch.float32, q_s.device) for _ in range(3))


def attention_kl_rows(q_s: Tensor, k_s: Optional[Tensor], q_t: Tensor, k_t: Optional[Tensor],
                      key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    same_qk = keys_are_queries(k_s, k_t)
    inputs = _kl_inputs(q_s, k_s, q_t, k_t, key_mask)
    kl_rows, lse_s, lse_t = _row_stats(q_s)
    extension, launch = _extension(q_s.device)
    with _on(q_s.device):
        extension.attention_kl_forward(*_kl_launch_args(inputs, same_qk), *q_s.shape[:3], kl_rows.data_ptr(),
                                       lse_s.data_ptr(), lse_t.data_ptr(), *launch)
    return kl_rows, lse_s, lse_t


_kl_rows_op = custom_op("kdfast::attention_kl_rows", attention_kl_rows, mutates_args=(), device_types=("cpu", "cuda"))
_kl_rows_op.register_fake(lambda q_s, k_s, q_t, k_t, key_mask: _row_stats(q_s))


def _kl_grads(q_s: Tensor, k_s: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(dq, dk) fp32 contiguous; k = q: (dq + dk with the strides of q_s where dense, a [0] tensor)."""
    if k_s is None:
        return new_output_like(_last_dim_contiguous(q_s), torch.float32), q_s.new_empty((0,), dtype=torch.float32)
    return tuple(new_output(x.shape, torch.float32, x.device) for x in (q_s, k_s))


def attention_kl_rows_backward(q_s: Tensor, k_s: Optional[Tensor], q_t: Tensor, k_t: Optional[Tensor],
                               key_mask: Optional[Tensor], lse_s: Tensor, lse_t: Tensor,
                               coef: float) -> tuple[Tensor, Tensor]:
    same_qk = keys_are_queries(k_s, k_t)
    inputs = _kl_inputs(q_s, k_s, q_t, k_t, key_mask)
    lse_s, lse_t = lse_s.contiguous(), lse_t.contiguous()
    dq, dk = _kl_grads(q_s, k_s)
    extension, launch = _extension(q_s.device)
    with _on(q_s.device):
        extension.attention_kl_backward(*_kl_launch_args(inputs, same_qk), *q_s.shape[:3], lse_s.data_ptr(),
                                        lse_t.data_ptr(), coef, _grad_target(dq), _grad_target(dq if same_qk else dk),
                                        *launch)
    return dq, dk


_kl_rows_backward_op = custom_op("kdfast::attention_kl_rows_backward", attention_kl_rows_backward, mutates_args=(),
                                device_types=("cpu", "cuda"))
_kl_rows_backward_op.register_fake(lambda q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, coef: _kl_grads(q_s, k_s))


# --------------------------------------------------------------------------- attention-score MSE (Gram algebra)


def _mse_outputs(q_s: Tensor, with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """head_energy float64 [B*h]; dq_s, dk_s fp32 [B, h, L, d_s] contiguous ([0] without ``with_grad``)."""
    batch, heads = q_s.shape[:2]
    grads = (new_output(q_s.shape, torch.float32, q_s.device) if with_grad else
             q_s.new_empty((0,), dtype=torch.float32) for _ in range(2))
    return new_output((batch * heads,), torch.float64, q_s.device), *grads


def _mse_inputs(q_s, k_s, q_t, k_t, key_mask) -> tuple:
    """The four operands in fp32 and the mask as uint8: the tensors whose pointers the kernels read, kept
    alive by the caller until the launch returns."""
    return (*(x.float() for x in (q_s, k_s, q_t, k_t)), None if key_mask is None else key_mask.view(torch.uint8))


def _mse_launch_args(inputs: tuple) -> list:
    """Pointer and strides of each operand and of the mask, then the sizes (B, h, L, d_s, d_t)."""
    *operands, mask = inputs
    args = [value for x in operands for value in (x.data_ptr(), x.stride())]
    args += [0, (0, 0)] if mask is None else [mask.data_ptr(), mask.stride()]
    return args + [(*operands[0].shape, operands[2].shape[-1])]


def _gram_cpu(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_mask: Optional[Tensor], alpha_s: float,
              alpha_t: float, grad_scale_q: float, grad_scale_k: float,
              with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    energy, dq_s, dk_s = _mse_outputs(q_s, with_grad)
    inputs = _mse_inputs(q_s, k_s, q_t, k_t, key_mask)
    _ext.require_cpu().attention_mse_forward(*_mse_launch_args(inputs), alpha_s, alpha_t, grad_scale_q,
                                             grad_scale_k, energy.data_ptr(), dq_s.data_ptr() if with_grad else 0,
                                             dk_s.data_ptr() if with_grad else 0)
    return energy, dq_s, dk_s


def _gram_cuda(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_mask: Optional[Tensor], alpha_s: float,
               alpha_t: float, grad_scale_q: float, grad_scale_k: float,
               with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    extension, launch = _extension(q_s.device)
    energy, dq_s, dk_s = _mse_outputs(q_s, with_grad)
    inputs = _mse_inputs(q_s, k_s, q_t, k_t, key_mask)
    n_pad = extension.attention_mse_padded_width(q_s.shape[-1] + q_t.shape[-1])
    gram_q, gram_k = (new_output((energy.shape[0], n_pad, n_pad), torch.float64, q_s.device) for _ in range(2))
    with _on(q_s.device):
        extension.attention_mse_forward(*_mse_launch_args(inputs), alpha_s, alpha_t, grad_scale_q, grad_scale_k,
                                        gram_q.data_ptr(), gram_k.data_ptr(), energy.data_ptr(),
                                        dq_s.data_ptr() if with_grad else 0, dk_s.data_ptr() if with_grad else 0,
                                        *launch)
    return energy, dq_s, dk_s


def attention_mse_gram(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_mask: Optional[Tensor],
                       alpha_s: float, alpha_t: float, grad_scale_q: float, grad_scale_k: float,
                       with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The op's implementation for ``q_s``'s device (see the module docstring)."""
    kernel = _gram_cuda if q_s.device.type == "cuda" else _gram_cpu
    return kernel(q_s, k_s, q_t, k_t, key_mask, alpha_s, alpha_t, grad_scale_q, grad_scale_k, with_grad)


_gram_op = custom_op("kdfast::attention_mse_gram", _gram_cpu, mutates_args=(), device_types="cpu")
_gram_op.register_kernel("cuda")(_gram_cuda)
_gram_op.register_fake(lambda q_s, k_s, q_t, k_t, key_mask, alpha_s, alpha_t, grad_scale_q, grad_scale_k, with_grad:
                       _mse_outputs(q_s, with_grad))
