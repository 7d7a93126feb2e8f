"""``attention_score_mse`` on the ``triton`` backend: Gram algebra in float64 (DESIGN.md), launched by the
``triton_op`` ``kdfast::attention_mse_gram_triton(q_s, k_s, q_t, k_t, key_mask, grad_scale_q, grad_scale_k,
with_grad) -> (head_energy, dq_s, dk_s)`` (the kernel contract of ``kdfast/functions/attention_score_mse.py``
with alpha = d^-1/2 on both sides; an explicit fake implementation, no autograd formula: it is the forward
piece of the loss op ``kdfast::attention_score_mse``, whose registered formula scales the gradients it keeps).

Per (batch, head) the sides are concatenated into L x n operands (n = d_s + d_t, padded to N_PAD):
X = [a_s Q_s | -a_t Q_t] and Y = [K_s | K_t] with masked key rows 0. Three kernels:

1. ``_gram_kernel``: one BLOCK_N x BLOCK_N tile of G = P^T P per program, P = X or Y, looping
   over L. Loads are cast to float64 before ``tl.dot`` (products of fp32 values are exact there),
   so E keeps its digits when the student is close to the teacher.
2. ``_energy_kernel``: E = <GQ, GK> per head, one program each (deterministic).
3. ``_grad_kernel``: one BLOCK_L x BLOCK_D tile of grad_scale * (P G)[:, :d_s] (dQ_s from X, GK;
   dK_s from Y, GQ), float64 accumulation, stored as fp32.

Workspace: two float64 [B*h, N_PAD, N_PAD] Grams; nothing of size L x L.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kdfast._buffers import new_output
from kdfast.functions.attention_score_mse import decline
from kdfast.ops import attention
from kdfast.ops._library import triton_op, wrap_triton
from kdfast.triton.static import KernelSpec

MAX_HEAD_DIM = 128
BLOCK_N = 32
BLOCK_L = 32


@triton.jit
def _operand_tile(s_ptr, t_ptr, mask_ptr, bh, rows, cols, L, H, d_s, d_t,
                  s_sb, s_sh, s_sl, s_sc, t_sb, t_sh, t_sl, t_sc, m_sb, m_sl,
                  IS_QUERY: tl.constexpr, HAS_MASK: tl.constexpr):
    """Rows x cols of X (IS_QUERY) or Y as float64; rows >= L, masked keys and padding are 0."""
    b = bh // H
    h = bh % H
    row_ok = rows < L
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * m_sb + rows * m_sl, mask=row_ok, other=0)
        row_ok = row_ok & (keep != 0)
    is_s = cols < d_s
    is_t = (cols >= d_s) & (cols < d_s + d_t)
    s = tl.load(s_ptr + b * s_sb + h * s_sh + rows[:, None] * s_sl + cols[None, :] * s_sc,
                mask=row_ok[:, None] & is_s[None, :], other=0.0).to(tl.float64)
    t = tl.load(t_ptr + b * t_sb + h * t_sh + rows[:, None] * t_sl + (cols - d_s)[None, :] * t_sc,
                mask=row_ok[:, None] & is_t[None, :], other=0.0).to(tl.float64)
    if IS_QUERY:
        s = s / tl.sqrt(d_s.to(tl.float64))
        t = -t / tl.sqrt(d_t.to(tl.float64))
    return s + t


@triton.jit
def _gram_kernel(s_ptr, t_ptr, mask_ptr, gram_ptr, L, H, d_s, d_t,
                 s_sb, s_sh, s_sl, s_sc, t_sb, t_sh, t_sl, t_sc, m_sb, m_sl,
                 N_PAD: tl.constexpr, IS_QUERY: tl.constexpr, HAS_MASK: tl.constexpr,
                 BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    tile_i = tl.program_id(0)
    tile_j = tl.program_id(1)
    bh = tl.program_id(2)
    cols_i = tile_i * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_j = tile_j * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float64)
    for start in range(0, L, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        p_i = _operand_tile(s_ptr, t_ptr, mask_ptr, bh, rows, cols_i, L, H, d_s, d_t, s_sb, s_sh, s_sl, s_sc,
                            t_sb, t_sh, t_sl, t_sc, m_sb, m_sl, IS_QUERY, HAS_MASK)
        p_j = _operand_tile(s_ptr, t_ptr, mask_ptr, bh, rows, cols_j, L, H, d_s, d_t, s_sb, s_sh, s_sl, s_sc,
                            t_sb, t_sh, t_sl, t_sc, m_sb, m_sl, IS_QUERY, HAS_MASK)
        acc += tl.dot(tl.trans(p_i), p_j)
    out = gram_ptr + bh.to(tl.int64) * N_PAD * N_PAD + cols_i[:, None] * N_PAD + cols_j[None, :]
    tl.store(out, acc)


@triton.jit
def _energy_kernel(gq_ptr, gk_ptr, energy_ptr, N_PAD: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    base = bh.to(tl.int64) * N_PAD * N_PAD
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, N_PAD * N_PAD, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(gq_ptr + base + offs) * tl.load(gk_ptr + base + offs)
    tl.store(energy_ptr + bh, tl.sum(acc, axis=0))


@triton.jit
def _grad_kernel(s_ptr, t_ptr, mask_ptr, gram_ptr, out_ptr, grad_scale, L, H, d_s, d_t,
                 s_sb, s_sh, s_sl, s_sc, t_sb, t_sh, t_sl, t_sc, m_sb, m_sl,
                 N_PAD: tl.constexpr, IS_QUERY: tl.constexpr, HAS_MASK: tl.constexpr,
                 BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    tile_l = tl.program_id(0)
    tile_d = tl.program_id(1)
    bh = tl.program_id(2)
    rows = tile_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tile_d * BLOCK_N + tl.arange(0, BLOCK_N)
    gram = gram_ptr + bh.to(tl.int64) * N_PAD * N_PAD
    acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float64)
    for k0 in range(0, N_PAD, BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        p = _operand_tile(s_ptr, t_ptr, mask_ptr, bh, rows, ks, L, H, d_s, d_t, s_sb, s_sh, s_sl, s_sc,
                          t_sb, t_sh, t_sl, t_sc, m_sb, m_sl, IS_QUERY, HAS_MASK)
        g = tl.load(gram + ks[:, None] * N_PAD + cols[None, :])
        acc += tl.dot(p, g)
    acc = acc * grad_scale
    out = out_ptr + bh.to(tl.int64) * L * d_s + rows[:, None] * d_s + cols[None, :]
    tl.store(out, acc.to(tl.float32), mask=(rows[:, None] < L) & (cols[None, :] < d_s))


def _side_args(student: torch.Tensor, teacher: torch.Tensor, key_mask: Optional[torch.Tensor]) -> list:
    mask_strides = (0, 0) if key_mask is None else key_mask.stride()
    return [*student.stride(), *teacher.stride(), *mask_strides]


def _outputs(q_s: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """head_energy float64 [B*h]; dq_s, dk_s fp32 [B, h, L, d_s] contiguous ([0] without ``with_grad``)."""
    batch, heads = q_s.shape[:2]
    grads = (new_output(q_s.shape, torch.float32, q_s.device) if with_grad else
             q_s.new_empty((0,), dtype=torch.float32) for _ in range(2))
    return new_output((batch * heads,), torch.float64, q_s.device), *grads


def attention_mse_gram(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        key_mask: Optional[torch.Tensor], grad_scale_q: float, grad_scale_k: float,
                        with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, length, d_s = q_s.shape
    d_t = q_t.shape[-1]
    n_pad = triton.cdiv(d_s + d_t, BLOCK_N) * BLOCK_N
    device = q_s.device
    energy, dq_s, dk_s = _outputs(q_s, with_grad)
    mask = None if key_mask is None else key_mask.view(torch.uint8)
    mask_arg = q_s if mask is None else mask  # any pointer; never read without HAS_MASK
    grams = {}
    for name, (s, t, has_mask) in {"q": (q_s, q_t, False), "k": (k_s, k_t, mask is not None)}.items():
        grams[name] = new_output((batch * heads, n_pad, n_pad), torch.float64, device)
        grid = (n_pad // BLOCK_N, n_pad // BLOCK_N, batch * heads)
        wrap_triton(_gram_kernel)[grid](s, t, mask_arg, grams[name], length, heads, d_s, d_t, *_side_args(s, t, mask),
                                        N_PAD=n_pad, IS_QUERY=name == "q", HAS_MASK=has_mask, BLOCK_L=BLOCK_L,
                                        BLOCK_N=BLOCK_N)
    wrap_triton(_energy_kernel)[(batch * heads,)](grams["q"], grams["k"], energy, N_PAD=n_pad, BLOCK=1024)
    if not with_grad:
        return energy, dq_s, dk_s
    # dQ_s = grad_scale_q X GK and dK_s = grad_scale_k Y GQ: each side multiplies its operand by the other's Gram.
    for s, t, gram, has_mask, is_query, out, scale in ((q_s, q_t, grams["k"], False, True, dq_s, grad_scale_q),
                                                       (k_s, k_t, grams["q"], mask is not None, False, dk_s,
                                                        grad_scale_k)):
        grid = (triton.cdiv(length, BLOCK_L), triton.cdiv(d_s, BLOCK_N), batch * heads)
        wrap_triton(_grad_kernel)[grid](s, t, mask_arg, gram, out, scale, length, heads, d_s, d_t,
                                        *_side_args(s, t, mask), N_PAD=n_pad, IS_QUERY=is_query, HAS_MASK=has_mask,
                                        BLOCK_L=BLOCK_L, BLOCK_N=BLOCK_N)
    return energy, dq_s, dk_s


_gram_op = triton_op("kdfast::attention_mse_gram_triton", attention_mse_gram, mutates_args=())
_gram_op.register_fake(lambda q_s, k_s, q_t, k_t, key_mask, grad_scale_q, grad_scale_k, with_grad:
                       _outputs(q_s, with_grad))


def kernel(q_s, k_s, q_t, k_t, key_mask, alpha_s, alpha_t, grad_scale_q, grad_scale_k, with_grad):
    """The driver's kernel contract on the implementation of op ``kdfast::attention_mse_gram_triton``. The kernels
    scale the scores by d^-1/2 themselves, which is what the driver passes as ``alpha_s``, ``alpha_t``."""
    return attention_mse_gram(q_s, k_s, q_t, k_t, key_mask, grad_scale_q, grad_scale_k, with_grad)


def unsupported_reason(q_s=None, q_t=None, **_) -> Optional[str]:
    return decline(q_s, q_t, "triton", MAX_HEAD_DIM)


def attention_score_mse(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        key_mask: Optional[torch.Tensor], include_masked_keys: bool) -> torch.Tensor:
    return attention.attention_score_mse("triton", q_s, k_s, q_t, k_t, key_mask, include_masked_keys)


def _signature(fn, types: dict, constexprs: dict) -> dict:
    """Triton types of ``fn``'s arguments in their order: constexprs by name, the rest from ``types``."""
    return {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}


def _specs() -> list[KernelSpec]:
    specs = []
    n_pad = 2 * MAX_HEAD_DIM
    for dtype in ("*fp32", "*bf16"):
        types = {"s_ptr": dtype, "t_ptr": dtype, "mask_ptr": "*u8", "gram_ptr": "*fp64", "out_ptr": "*fp32",
                 "grad_scale": "fp32", "L": "i32", "H": "i32", "d_s": "i32", "d_t": "i32",
                 **{f"{side}_s{dim}": "i32" for side in "st" for dim in "bhlc"}, "m_sb": "i32", "m_sl": "i32"}
        for is_query, has_mask in ((True, False), (False, True)):
            flags = {"N_PAD": n_pad, "IS_QUERY": is_query, "HAS_MASK": has_mask, "BLOCK_L": BLOCK_L,
                     "BLOCK_N": BLOCK_N}
            tag = f"{dtype[1:]}_{'q' if is_query else 'k'}"
            for kind, fn in (("gram", _gram_kernel), ("grad", _grad_kernel)):
                specs.append(KernelSpec(f"attention_mse_{kind}_{tag}", fn, _signature(fn, types, flags), flags))
    energy_flags = {"N_PAD": n_pad, "BLOCK": 1024}
    specs.append(KernelSpec("attention_mse_energy", _energy_kernel,
                            _signature(_energy_kernel, {"gq_ptr": "*fp64", "gk_ptr": "*fp64", "energy_ptr": "*fp64"},
                                       energy_flags), energy_flags))
    return specs


STATIC_COMPILE_SPECS = _specs()
