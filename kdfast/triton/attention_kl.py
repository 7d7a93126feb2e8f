"""MiniLM attention KL on the ``triton`` backend: the flash-style kernels launched by two ``triton_op``s, and
the forward and backward of op ``kdfast::attention_kl`` on them. Memory is O(B·h·L) besides the inputs
and gradients: no [L, L] tensor exists.

- ``kdfast::attention_kl_rows_triton(q_s, k_s, q_t, k_t, key_mask) -> (kl, lse_s, lse_t)``: per query row,
  KL(p_t || p_s) and both log-sum-exps, fp32 [B, h, L] (0 on rows without a valid key);
- ``kdfast::attention_kl_rows_backward_triton(q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, scale) -> (dq, dk)``:
  ``scale`` (one fp32 element on the device, grad_output / n) times the gradients of the summed row KLs, in
  the inputs' dtypes.

Shapes: q_s, k_s [B, h, L, d_s]; q_t, k_t [B, h, L, d_t]; key_mask [B, L] (True = real token).
Any strides with a unit last stride are read in place (relation heads are views of x [B, L, H]); ``k_s``,
``k_t`` None mean k = q (relation KL: the backward writes d q_s + d k_s as one gradient, dk a [0] tensor).
Both ops have explicit fake implementations (output allocation only) and no autograd formula: they are the
forward and backward pieces of the loss ops ``kdfast::attention_kl`` and ``relation_kl``, whose registered
formulas call them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from kdfast._backends import triton_interpreting
from kdfast._buffers import new_output, new_output_like
from kdfast.ops import attention
from kdfast.ops._library import triton_op, wrap_triton
from kdfast.ops.attention_kernels import keys_are_queries
from kdfast.triton import _attention_kl_kernels as kernels
from kdfast.triton.static import KernelSpec

MAX_HEAD_DIM = 128
MAX_HEADS = 65535  # CUDA's limit on grid axis 1, which runs over batch x heads
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(d: int) -> int:
    """Tile width for head size d: a power of two, at least 16 (the smallest tl.dot K)."""
    return max(16, 1 << (d - 1).bit_length())


# (kernel, fp32 inputs, a head size > 64) -> (BLOCK_M, BLOCK_N, num_warps). BLOCK_M tiles query rows,
# BLOCK_N key rows; fp32 tiles go through "tf32x3" dots, which need about twice the registers.
_GPU_TILES = {
    ("fwd", True, False): (64, 32, 4), ("fwd", True, True): (64, 16, 4),
    ("fwd", False, False): (128, 64, 8), ("fwd", False, True): (128, 32, 8),
    ("dq", True, False): (64, 16, 4), ("dq", True, True): (16, 16, 8),
    ("dq", False, False): (64, 32, 4), ("dq", False, True): (64, 32, 4),
    ("dk", True, False): (32, 32, 4), ("dk", True, True): (16, 32, 4),
    ("dk", False, False): (64, 64, 4), ("dk", False, True): (32, 64, 8),
}


def launch_config(kernel: str, d_s: int, d_t: int, fp32: bool) -> dict:
    """Tile sizes and warps of ``kernel`` ("fwd", "dq", "dk") for head sizes (d_s, d_t).

    Chosen so that every kernel compiles without register spills on sm_80 and sm_90
    (``python -m kdfast.triton.static``). Under the interpreter larger tiles only save Python
    overhead, so one 64 x 64 tile is used everywhere.
    """
    if triton_interpreting():
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    block_m, block_n, warps = _GPU_TILES[kernel, fp32, max(d_s, d_t) > 64]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": 2}


def _dot_fp32(*tensors: torch.Tensor) -> bool:
    """Feed tl.dot fp32 tiles: always under the interpreter (numpy has no bf16), else for fp32 inputs."""
    return triton_interpreting() or any(t.dtype == torch.float32 for t in tensors)


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) element strides of a [B, h, L, d] view."""
    return x.stride(0), x.stride(1), x.stride(2)


def _mask_args(key_mask: Optional[torch.Tensor], fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The mask as uint8 [B, L] (contiguous rows) and its batch stride; a dummy pointer without a mask."""
    if key_mask is None:
        return fallback, 0
    mask = key_mask.contiguous().view(torch.uint8)
    return mask, mask.stride(0)


def _operands(q_s, k_s, q_t, k_t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four kernel operands with unit last stride; k = q when ``k_s``, ``k_t`` are None."""
    same_qk = keys_are_queries(k_s, k_t)
    q_s, q_t = unit_last_stride(q_s), unit_last_stride(q_t)
    return (q_s, q_s, q_t, q_t) if same_qk else (q_s, unit_last_stride(k_s), q_t, unit_last_stride(k_t))


def _row_stats(q_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kl, lse_s, lse_t: fp32 [B, h, L] each."""
    return tuple(new_output(q_s.shape[:3], torch.float32, q_s.device) for _ in range(3))


def attention_kl_rows(q_s: torch.Tensor, k_s: Optional[torch.Tensor], q_t: torch.Tensor, k_t: Optional[torch.Tensor],
                      key_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_s, k_s, q_t, k_t = _operands(q_s, k_s, q_t, k_t)
    b, h, length, d_s = q_s.shape
    d_t = q_t.shape[-1]
    kl, lse_s, lse_t = _row_stats(q_s)
    mask, stride_mask = _mask_args(key_mask, kl)
    cfg = launch_config("fwd", d_s, d_t, _dot_fp32(q_s, q_t))
    wrap_triton(kernels.attention_kl_fwd)[(triton.cdiv(length, cfg["BLOCK_M"]), b * h)](
        q_s, k_s, q_t, k_t, mask, kl, lse_s, lse_t,
        *_strides(q_s), *_strides(k_s), *_strides(q_t), *_strides(k_t),
        stride_mask, h, length, d_s, d_t, d_s ** -0.5, d_t ** -0.5,
        HAS_MASK=key_mask is not None, BLOCK_DS=_pow2(d_s), BLOCK_DT=_pow2(d_t),
        DOT_FP32=_dot_fp32(q_s, q_t), **cfg)
    return kl, lse_s, lse_t


_rows_op = triton_op("kdfast::attention_kl_rows_triton", attention_kl_rows, mutates_args=())
_rows_op.register_fake(lambda q_s, k_s, q_t, k_t, key_mask: _row_stats(q_s))


def _grads(q_s: torch.Tensor, k_s: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, the fp32 dq buffer the key pass adds when k = q). dq, dk in the inputs' dtypes, contiguous; k = q
    (k_s None): dq is dq + dk with the strides of q_s where dense, dk a [0] tensor, and the fp32 buffer dq itself
    when fp32."""
    if k_s is not None:
        dq, dk = (new_output(x.shape, x.dtype, x.device) for x in (q_s, k_s))
        return dq, dk, dq
    dx = new_output_like(unit_last_stride(q_s), q_s.dtype)
    dq32 = dx if dx.dtype == torch.float32 else new_output_like(dx, torch.float32)
    return dx, q_s.new_empty((0,), dtype=torch.float32), dq32


def attention_kl_rows_backward(q_s: torch.Tensor, k_s: Optional[torch.Tensor], q_t: torch.Tensor,
                               k_t: Optional[torch.Tensor], key_mask: Optional[torch.Tensor], lse_s: torch.Tensor,
                               lse_t: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    add_dq = k_s is None
    dq, dk, dq32 = _grads(q_s, k_s)
    q_s, k_s, q_t, k_t = _operands(q_s, k_s, q_t, k_t)
    dq_target, dk_target = (dq32, dq) if add_dq else (dq, dk)
    b, h, length, d_s = q_s.shape
    d_t = q_t.shape[-1]
    mask, stride_mask = _mask_args(key_mask, lse_s)
    fp32 = _dot_fp32(q_s, q_t)
    operands = (q_s, k_s, q_t, k_t, mask, lse_s, lse_t, scale)
    strides = (*_strides(q_s), *_strides(k_s), *_strides(q_t), *_strides(k_t))
    scalars = (stride_mask, h, length, d_s, d_t, d_s ** -0.5, d_t ** -0.5)
    common = dict(HAS_MASK=key_mask is not None, BLOCK_DS=_pow2(d_s), BLOCK_DT=_pow2(d_t), DOT_FP32=fp32)

    cfg = launch_config("dq", d_s, d_t, fp32)
    wrap_triton(kernels.attention_kl_dq)[(triton.cdiv(length, cfg["BLOCK_M"]), b * h)](
        *operands, dq_target, *strides, *_strides(dq_target), *scalars, **common, **cfg)
    cfg = launch_config("dk", d_s, d_t, fp32)
    wrap_triton(kernels.attention_kl_dk)[(triton.cdiv(length, cfg["BLOCK_N"]), b * h)](
        *operands, dq_target, dk_target, *strides, *_strides(dk_target), *scalars, ADD_DQ=add_dq, **common, **cfg)
    return dq, dk


_rows_backward_op = triton_op("kdfast::attention_kl_rows_backward_triton", attention_kl_rows_backward, mutates_args=())
_rows_backward_op.register_fake(lambda q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, scale: _grads(q_s, k_s)[:2])


def mean_over_valid_rows(kl: torch.Tensor, key_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the row KLs [B, h, L] over valid query rows, and its normaliser n (0-dim fp32, kept on
    the device: no host sync). An all-masked batch gives 0."""
    if key_mask is None:
        n = torch.tensor(float(max(kl.numel(), 1)), device=kl.device)
        return kl.sum() / n, n
    n = (key_mask.sum() * kl.shape[1]).clamp_min(1).to(torch.float32)
    return torch.where(key_mask[:, None, :], kl, 0.0).sum() / n, n


def grad_scale(grad_output: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """grad_output / n as the one-element fp32 tensor the backward kernels read."""
    return (grad_output.to(torch.float32) / n).reshape(1)


def forward(q_s, k_s, q_t, k_t, key_mask):
    """Op ``attention_kl``'s forward (``k_s``, ``k_t`` None: k = q, op ``relation_kl``): (mean KL(p_t || p_s),
    lse_s, lse_t [B, h, L], row count n)."""
    kl, lse_s, lse_t = attention_kl_rows(q_s, k_s, q_t, k_t, key_mask)  # op kdfast::attention_kl_rows_triton
    loss, n = mean_over_valid_rows(kl, key_mask)
    return loss, lse_s, lse_t, n


def backward(grad_output, q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, n):
    """Op ``attention_kl``'s backward: (d q_s, d k_s) from the inputs and the two LSEs (k = q: (d q_s + d k_s,
    a [0] tensor))."""
    return attention_kl_rows_backward(q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, grad_scale(grad_output, n))


def head_size_reason(d_s: int, d_t: int, dtypes, batch_heads: int) -> Optional[str]:
    """Why the kernels cannot take these inputs (None when they can); each reason names the way out."""
    for dtype in dtypes:
        if dtype not in SUPPORTED_DTYPES:
            return f"the triton kernels take float32, bfloat16 or float16, got {dtype}; use backend='torch'"
    if max(d_s, d_t) > MAX_HEAD_DIM:
        return (f"the triton kernels take head sizes up to {MAX_HEAD_DIM}, got d_s={d_s}, d_t={d_t}; "
                "use backend='torch'")
    if batch_heads > MAX_HEADS:
        return f"the triton kernels take B*heads up to {MAX_HEADS}, got {batch_heads}; use backend='torch'"
    return None


def unsupported_reason(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                       key_mask: Optional[torch.Tensor] = None) -> Optional[str]:
    return head_size_reason(q_s.shape[-1], q_t.shape[-1], (q_s.dtype, q_t.dtype), q_s.shape[0] * q_s.shape[1])


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                 key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over (B, h, valid rows) of KL(softmax(q_t k_t^T/sqrt(d_t)) || softmax(q_s k_s^T/sqrt(d_s)))."""
    return attention.attention_kl("triton", q_s, k_s, q_t, k_t, key_mask)


def _spec(kernel: str, dtype: str, d_s: int, d_t: int) -> KernelSpec:
    """Static-compile spec of one kernel with student and teacher tiles in ``dtype`` ("fp32", "bf16")."""
    fn = getattr(kernels, f"attention_kl_{kernel}")
    fp32 = dtype == "fp32"
    cfg = dict(launch_config(kernel, d_s, d_t, fp32))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = dict(HAS_MASK=True, BLOCK_DS=_pow2(d_s), BLOCK_DT=_pow2(d_t), DOT_FP32=fp32, **cfg)
    if kernel == "dk":
        constexprs["ADD_DQ"] = True
    pointer = {"QS": dtype, "KS": dtype, "QT": dtype, "KT": dtype, "MASK": "u8", "DQ": dtype, "DK": dtype}
    if kernel == "dk":
        pointer["DQ"] = "fp32"
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("alpha"):
            signature[name] = "fp32"
        elif name.startswith("stride") or name in ("H", "L", "D_S", "D_T"):
            signature[name] = "i32"
        else:
            signature[name] = "*" + pointer.get(name, "fp32")
    return KernelSpec(name=f"attention_kl_{kernel}_{dtype}_ds{d_s}_dt{d_t}", fn=fn, signature=signature,
                      constexprs=constexprs, num_warps=num_warps, num_stages=num_stages)


STATIC_COMPILE_SPECS = [_spec(kernel, dtype, d_s, d_t)
                        for kernel in ("fwd", "dq", "dk")
                        for dtype in ("fp32", "bf16")
                        for d_s, d_t in ((64, 48), (128, 96))]
