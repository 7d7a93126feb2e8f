"""fp32 products of one LM head with a chunk of rows: its logits, and the gradient products."""
from __future__ import annotations

from typing import Optional

import torch


def mm_out_dtype_works(device: torch.device) -> bool:
    """Whether ``torch.mm(a16, b16, out_dtype=float32)`` (fp32 accumulation and output) runs here."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b of two 16-bit matrices, accumulated and returned in fp32: ``mm(out_dtype=float32)`` on
    CUDA; elsewhere the same products in fp32 (exact: a product of two 16-bit floats fits fp32)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


class Head:
    """One LM head (weight [V, H], bias [V]) for fp32 products of a chunk.

    16-bit weights are used as they are where torch can multiply them with an fp32 output (CUDA),
    else upcast once; every product accumulates and returns fp32, so logits are never rounded.
    For a bf16 head the gradient products take d loss / d logits split in two bf16 parts (hi + lo,
    ~2^-17 relative), two tensor-core products in place of one slow fp32 one."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.native16 = weight.dtype != torch.float32 and mm_out_dtype_works(weight.device)
        self.weight = weight if self.native16 or weight.dtype == torch.float32 else weight.float()
        self.weight32 = weight if weight.dtype == torch.float32 else None  # for fp32 gradient products
        self.bias = None if bias is None else bias.float()
        # fp16 keeps fp32 gradient products: its exponent range would flush the small gradients to 0.
        self.split_grads = self.native16 and weight.dtype == torch.bfloat16

    def logits_into(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out [C, V] fp32 = x [C, H] @ weight^T + bias; ``out`` is row-major, or vocab-major
        (``out.t()`` contiguous), which is filled as out^T = weight @ x^T + bias[:, None]."""
        if self.native16:
            mm_fp32(x.to(self.weight.dtype), self.weight.t(), out=out)
            if self.bias is not None:
                out.add_(self.bias)
            return
        x = x.float()
        if out.is_contiguous():
            left, right, target, bias = x, self.weight.t(), out, self.bias
        else:
            left, right, target = self.weight, x.t(), out.t()
            bias = None if self.bias is None else self.bias.unsqueeze(1)
        if bias is None:
            torch.mm(left, right, out=target)
        else:
            torch.addmm(bias, left, right, out=target)

    def fp32_weight(self) -> torch.Tensor:
        if self.weight32 is None:
            self.weight32 = self.weight.float()
        return self.weight32

    def grad_operands(self, g: torch.Tensor, scratch: torch.Tensor) -> "list[torch.Tensor]":
        """d loss / d logits g [C, V] fp32 as the operands of the gradient products: ``[g]``, or for a
        bf16 head ``[hi, lo]`` in bf16 with hi + lo = g to ~2^-17 relative. The split is written into
        ``scratch`` (a spent fp32 [C, V] chunk, exactly the bytes of two bf16 ones) and consumes g."""
        if not self.split_grads:
            return [g]
        halves = scratch.view(-1).view(torch.bfloat16)
        hi, lo = halves[: g.numel()].view(g.shape), halves[g.numel():].view(g.shape)
        hi.copy_(g)
        lo.copy_(g.sub_(hi))  # g - hi is exact in fp32
        return [hi, lo]

    def times_weight(self, operands: "list[torch.Tensor]", out: torch.Tensor) -> torch.Tensor:
        """out [C, H] fp32 = (sum of operands) [C, V] @ weight."""
        if not self.split_grads:
            return torch.mm(operands[0], self.fp32_weight(), out=out)
        mm_fp32(operands[0], self.weight, out=out)
        return out.add_(mm_fp32(operands[1], self.weight))

    def add_weight_grad_(self, d_weight: torch.Tensor, operands: "list[torch.Tensor]", x: torch.Tensor,
                         first: bool) -> None:
        """d_weight [V, H] fp32 += (sum of operands)^T @ x [C, H]; ``first`` overwrites instead (so the
        [V, H] buffer needs no zeroing pass: 1 GiB at V = 128256, H = 2048)."""
        if not self.split_grads:
            if first:
                torch.mm(operands[0].t(), x.float(), out=d_weight)
            else:
                d_weight.addmm_(operands[0].t(), x.float())
            return
        for i, operand in enumerate(operands):
            product = mm_fp32(operand.t(), x.to(self.weight.dtype))
            if first and i == 0:
                d_weight.copy_(product)
            else:
                d_weight.add_(product)
