"""The chunked vocabulary-KD autograd Functions shared by every kernel backend (cpu, cuda, triton).

``fused_linear_kd``: per chunk of C selected rows (rows with a label, or kept by ``mask``), the
teacher and student logits [C, V] are computed in fp32 by torch matmuls, a backend *row kernel*
turns the student logits into d loss / d logits in place, and the gradients of the student hidden
states, weight and bias are accumulated in fp32. Backward only scales them by grad_output.
Extra memory is O(C x V) for the two logit chunks plus the fp32 gradients; nothing [N, V] exists.

``kd_kl``: the same row kernel on given logits (no matmuls); its gradient buffer is [N, V] like
the input.

Row kernel contract (one function per backend, e.g. ``kdfast.cpu.fused_linear_kd.rows``)::

    rows(s, t, labels, kd_coef, mlm_coef, temperature, kind, beta) -> (kd_row, mlm_row)

- ``s`` [C, V] fp32 student logits, overwritten with
  ``kd_coef[r] * d kd_row / d a + mlm_coef[r] * (softmax(s) - onehot(labels[r]))``, a = s / T, where
  with ``q = softmax(a)``, ``p = softmax(t / T)`` and ``m = beta p + (1 - beta) q``:
  ``kl``, ``soft_ce``: ``d/da = q - p``; ``reverse_kl`` (KL(q || p)): ``q * ((log q - log p) - KL(q || p))``;
  ``jsd`` (beta KL(p || m) + (1 - beta) KL(q || m)): ``(1 - beta) * q * ((log q - log m) - KL(q || m))``;
- ``t`` [C, V] fp32 teacher logits with the strides of ``s`` (read only; -inf entries have p = 0: top-k,
  never with ``reverse_kl``);
- ``labels`` [C] int64, -1 means no MLM term for the row; ``kd_coef``, ``mlm_coef`` [C] fp32;
  ``kind`` one of ``kdfast._reduction.KINDS``; ``beta`` read by ``jsd``;
- returns ``kd_row`` [C] fp32, the row's divergence (``kind``), unscaled, and ``mlm_row`` [C] fp32,
  ``lse(s) - s[label]`` (0 for rows without a label).

Every kernel takes row-major ``s``, ``t`` (unit stride along V). A kernel with ``vocab_major = True``
also takes vocab-major ones (unit stride along C: ``s.t()`` is a contiguous [V, C]) and the fused
driver then fills its chunks that way, as ``W [V, H] @ x^T``: MKL computes that product faster than
``x @ W^T`` on CPU, and the gradient products read the transposed chunk as fast.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kdfast._buffers import new_output, workspace
from kdfast._reduction import KINDS, kd_divisor, kd_factor, mlm_divisor
from kdfast.functions.outputs import KDOutput
from kdfast.functions.sparse_targets import SparseTargets

RowKernel = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]

# Bytes for the two fp32 logit chunks: on CPU, big enough that the chunk matmuls run as fast as whole
# ones (~550 rows at V=30522), small next to the [N, V] logits; on GPU, far below its memory.
CPU_CHUNK_BYTES = 128 * 2**20
CUDA_CHUNK_BYTES = 1024 * 2**20
# ... but on CPU at least this many rows while free memory allows: fewer rows slow the head matmuls at LLM
# vocabularies (V = 128256, H = 2048, 2 cores: 9.2 ms per row at 128 rows, 8.5 at 256, 8.4 at 512).
CPU_MIN_CHUNK_ROWS = 256


def _free_bytes(device: torch.device) -> Optional[int]:
    """Free memory of ``device`` in bytes (CUDA: the driver's count; CPU: Linux's MemAvailable), or
    None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def chunk_rows(rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk so the teacher and student fp32 logit chunks [C, V] fit the memory budget: the
    smaller of ``CUDA_CHUNK_BYTES`` (CUDA) or, on CPU, ``CPU_CHUNK_BYTES`` raised to hold
    ``CPU_MIN_CHUNK_ROWS`` rows, and a quarter of free memory. Independent of the number of rows.
    ``KDFAST_VOCAB_CHUNK_ROWS`` overrides it (for experiments)."""
    forced = os.environ.get("KDFAST_VOCAB_CHUNK_ROWS")
    if forced:
        return max(1, min(rows, int(forced)))
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else max(CPU_CHUNK_BYTES, 2 * CPU_MIN_CHUNK_ROWS * vocab * 4)
    free = _free_bytes(device)
    if free is not None:
        budget = min(budget, free // 4)
    return rows_within(rows, vocab, budget)


def rows_within(rows: int, vocab: int, budget: int) -> int:
    """Rows per chunk (a multiple of 16, at least 16, at most ``rows``) whose two fp32 [C, V] logit
    chunks fit ``budget`` bytes: fewer rows for a larger vocabulary, the same bytes."""
    chunk = max(16, (budget // (2 * vocab * 4)) // 16 * 16)
    return max(1, min(rows, chunk))


# --------------------------------------------------------------------------- phase hook (benchmarks)

_PHASE_HOOK: "list[Optional[Callable[[str], None]]]" = [None]  # the hook in force, set by phase_hook


@contextlib.contextmanager
def phase_hook(hook: Callable[[str], None]):
    """Within the block, the fused driver calls ``hook(phase)`` as each phase of each chunk ends:
    ``"start"`` (chunk begins), ``"student_logits"``, ``"teacher_logits"`` (with top-k), ``"row_kernel"``,
    ``"d_hidden"`` (with the bf16 split of the gradient), ``"d_weight"``. Off (the default) it costs one
    check per phase."""
    previous, _PHASE_HOOK[0] = _PHASE_HOOK[0], hook
    try:
        yield
    finally:
        _PHASE_HOOK[0] = previous


# --------------------------------------------------------------------------- fp32 products


def _mm_out_dtype_works(device: torch.device) -> bool:
    """Whether ``torch.mm(a16, b16, out_dtype=float32)`` (fp32 accumulation and output) runs here."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b of two 16-bit matrices, accumulated and returned in fp32: ``mm(out_dtype=float32)`` on
    CUDA; elsewhere the same products in fp32 (exact: a product of two 16-bit floats fits fp32)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


class _Head:
    """One LM head (weight [V, H], bias [V]) for fp32 products of a chunk.

    16-bit weights are used as they are where torch can multiply them with an fp32 output (CUDA),
    else upcast once; every product accumulates and returns fp32, so logits are never rounded.
    For a bf16 head the gradient products take d loss / d logits split in two bf16 parts (hi + lo,
    ~2^-17 relative), two tensor-core products in place of one slow fp32 one."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.native16 = weight.dtype != torch.float32 and _mm_out_dtype_works(weight.device)
        self.weight = weight if self.native16 or weight.dtype == torch.float32 else weight.float()
        self.weight32 = weight if weight.dtype == torch.float32 else None  # for fp32 gradient products
        self.bias = None if bias is None else bias.float()
        # fp16 keeps fp32 gradient products: its exponent range would flush the small gradients to 0.
        self.split_grads = self.native16 and weight.dtype == torch.bfloat16

    def logits_into(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out [C, V] fp32 = x [C, H] @ weight^T + bias; ``out`` is row-major, or vocab-major
        (``out.t()`` contiguous), which is filled as out^T = weight @ x^T + bias[:, None]."""
        if self.native16:
            _mm_fp32(x.to(self.weight.dtype), self.weight.t(), out=out)
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
        _mm_fp32(operands[0], self.weight, out=out)
        return out.add_(_mm_fp32(operands[1], self.weight))

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
            product = _mm_fp32(operand.t(), x.to(self.weight.dtype))
            if first and i == 0:
                d_weight.copy_(product)
            else:
                d_weight.add_(product)


# --------------------------------------------------------------------------- row selection


@dataclass
class _Selection:
    """The rows a call computes and their per-row coefficients (all [R], R = selected rows)."""

    index: Optional[torch.Tensor]  # [R] int64 row ids, or None when every row is selected
    labels: torch.Tensor           # [R] int64, -1 = no MLM term
    kd_coef: torch.Tensor          # [R] fp32, d loss / d kd_row * (1/T), 0 for non-KD rows
    mlm_coef: torch.Tensor         # [R] fp32, d loss / d mlm_row
    kd_scale: torch.Tensor         # [R] fp64, kd = sum(kd_scale * kd_row)
    mlm_divisor: float

    @property
    def count(self) -> int:
        return self.labels.shape[0]


def _select(rows: int, vocab: int, device: torch.device, labels: Optional[torch.Tensor], ignore_index: int,
            mask: Optional[torch.Tensor], row_weights: Optional[torch.Tensor], temperature: float,
            kd_weight: float, mlm_weight: float, reduction: str, t2_scale: bool) -> _Selection:
    """KD rows: ``mask``, else labelled rows, else all (none when kd_weight is 0).
    MLM rows: labelled rows when mlm_weight is not 0. A call computes the union."""
    all_rows = torch.ones(rows, dtype=torch.bool, device=device)
    kd_rows = all_rows if mask is None and labels is None else (mask if mask is not None else labels != ignore_index)
    if kd_weight == 0:
        kd_rows = torch.zeros_like(all_rows)
    mlm_rows = (labels != ignore_index) if (mlm_weight != 0 and labels is not None) else torch.zeros_like(all_rows)
    chosen = kd_rows | mlm_rows
    index = None if bool(chosen.all()) else chosen.nonzero().squeeze(1)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x if index is None else x.index_select(0, index)

    n_kd, n_mlm = int(kd_rows.sum()), int(mlm_rows.sum())
    kd_scale = pick(kd_rows).double() * (kd_factor(temperature, t2_scale) / kd_divisor(reduction, n_kd, vocab))
    if row_weights is not None:
        kd_scale = kd_scale * pick(row_weights).double()
    mlm_div = mlm_divisor(reduction, n_mlm)
    sel_mlm = pick(mlm_rows)
    if labels is not None:
        sel_labels = torch.where(sel_mlm, pick(labels), -1)
    else:
        sel_labels = torch.full_like(sel_mlm, -1, dtype=torch.long)
    return _Selection(index=index, labels=sel_labels.long().contiguous(),
                      kd_coef=(kd_scale * (kd_weight / temperature)).float().contiguous(),
                      mlm_coef=(sel_mlm.double() * (mlm_weight / mlm_div)).float().contiguous(),
                      kd_scale=kd_scale, mlm_divisor=mlm_div)


def _chunk_view(buf: torch.Tensor, rows: int, vocab: int, vocab_major: bool) -> torch.Tensor:
    """A [rows, V] view of the front of the flat buffer ``buf``: row-major, or vocab-major (its
    transpose contiguous)."""
    front = buf[: rows * vocab]
    return front.view(vocab, rows).t() if vocab_major else front.view(rows, vocab)


def _keep_topk(t: torch.Tensor, k: int) -> None:
    """Set every teacher logit below the row's k-th largest to -inf (in place): p = 0 there."""
    if k < t.shape[1]:
        kth = torch.topk(t, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        t.masked_fill_(t < kth, float("-inf"))


def _kd_vanishes(opts: dict) -> bool:
    """JSD at beta = 0 (m = q) or beta = 1 (m = p) is 0 with 0 gradient; row kernels are not asked for it."""
    return opts["kind"] == "jsd" and opts["beta"] in (0.0, 1.0)


def _fused_pass(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                opts: dict, need: "tuple[bool, bool, bool]", kd_weight: float, mlm_weight: float):
    """Loss sums and fp32 gradients of ``kd_weight * kd + mlm_weight * mlm``, chunk by chunk.

    Returns (kd [0-dim fp64], mlm [0-dim fp64], d_hidden, d_weight, d_bias); a gradient is None when
    ``need`` says it is not wanted. A zero ``kd_weight`` skips the teacher. With sparse targets
    (``opts["teacher_targets"]``, whose masses S are already in ``opts["row_weights"]``) the teacher
    chunk is filled from them instead of a teacher head."""
    row_kernel: RowKernel = opts["row_kernel"]
    rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    sel = _select(rows, vocab, device, opts["labels"], opts["ignore_index"], opts["mask"], opts["row_weights"],
                  opts["temperature"], kd_weight, mlm_weight, opts["reduction"], opts["t2_scale"])
    need_dh, need_dw, need_db = need
    d_hidden = torch.zeros(student_hidden.shape, dtype=torch.float32, device=device) if need_dh else None
    d_weight = torch.empty(student_weight.shape, dtype=torch.float32, device=device) if need_dw else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_db else None
    kd_sum = torch.zeros((), dtype=torch.float64, device=device)
    mlm_sum = torch.zeros((), dtype=torch.float64, device=device)
    if sel.count:
        with_teacher = kd_weight != 0 and not _kd_vanishes(opts)
        targets: Optional[SparseTargets] = opts.get("teacher_targets")
        student = _Head(student_weight, student_bias)
        teacher = _Head(teacher_weight, teacher_bias) if with_teacher and targets is None else None
        size = opts["chunk_rows"] or chunk_rows(sel.count, vocab, device)
        # Vocab-major chunks only for fp32 products (16-bit ones run on CUDA, where kernels are row-major).
        vocab_major = getattr(row_kernel, "vocab_major", False) and not student.native16 and not (
            teacher is not None and teacher.native16)
        mark = _PHASE_HOOK[0]
        with workspace(2 * size * vocab, device) as chunks:
            s_buf, t_buf = chunks[: size * vocab], chunks[size * vocab:]
            for start in range(0, sel.count, size):
                if mark:
                    mark("start")
                stop = min(start + size, sel.count)
                part = slice(start, stop)
                ids = None if sel.index is None else sel.index[part]
                x_s = student_hidden[part] if ids is None else student_hidden.index_select(0, ids)
                s, t = (_chunk_view(buf, stop - start, vocab, vocab_major) for buf in (s_buf, t_buf))
                student.logits_into(s, x_s)
                if mark:
                    mark("student_logits")
                if with_teacher and targets is not None:
                    targets.fill(t, part if ids is None else ids, opts["temperature"])
                elif with_teacher:
                    x_t = teacher_hidden[part] if ids is None else teacher_hidden.index_select(0, ids)
                    teacher.logits_into(t, x_t)
                    if opts["teacher_topk"] is not None:
                        _keep_topk(t, opts["teacher_topk"])
                else:
                    t.copy_(s)  # KL(q || q) = 0: the KD term vanishes, only the MLM gradient remains
                if mark:
                    mark("teacher_logits")
                kd_row, mlm_row = row_kernel(s, t, sel.labels[part], sel.kd_coef[part], sel.mlm_coef[part],
                                             opts["temperature"], opts["kind"] if with_teacher else "kl", opts["beta"])
                kd_sum += (kd_row.double() * sel.kd_scale[part]).sum()
                mlm_sum += mlm_row.double().sum()
                if mark:
                    mark("row_kernel")
                # s now holds d loss / d student logits for this chunk; t is spent.
                if need_db:
                    d_bias += s.sum(0)
                operands = student.grad_operands(s, scratch=t) if need_dh or need_dw else []
                if need_dh:
                    if ids is None:
                        student.times_weight(operands, out=d_hidden[part])
                    else:
                        rows_grad = student.times_weight(operands, out=x_s.new_empty(x_s.shape, dtype=torch.float32))
                        d_hidden.index_copy_(0, ids, rows_grad)
                if mark:
                    mark("d_hidden")
                if need_dw:
                    student.add_weight_grad_(d_weight, operands, x_s, first=start == 0)
                if mark:
                    mark("d_weight")
        if with_teacher and targets is not None and opts["kind"] == "kl":
            offset = targets.kl_offset()
            kd_sum += (sel.kd_scale * (offset if sel.index is None else offset[sel.index])).sum()
    if need_dw and not sel.count:
        d_weight.zero_()  # no chunk wrote it
    return kd_sum, mlm_sum / sel.mlm_divisor, d_hidden, d_weight, d_bias


class _FusedLinearKD(torch.autograd.Function):
    """Forward computes the loss and keeps the gradients of ``loss = kd_weight*kd + mlm_weight*mlm``.
    Backward scales them; when ``kd`` and ``mlm`` receive gradients in another ratio (a caller
    re-weighting the parts), it recomputes the MLM gradients alone and combines the two."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                opts: dict):
        kd_weight, mlm_weight = opts["kd_weight"], opts["mlm_weight"]
        need = tuple(ctx.needs_input_grad[:3])
        kd, mlm, d_hidden, d_weight, d_bias = _fused_pass(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, opts, need,
            kd_weight, mlm_weight)
        kd = (kd if kd_weight != 0 else kd * 0).float()
        mlm = (mlm if mlm_weight != 0 else mlm * 0).float()
        ctx.opts, ctx.need = opts, need
        ctx.save_for_backward(d_hidden, d_weight, d_bias, student_hidden, student_weight, student_bias)
        return kd_weight * kd + mlm_weight * mlm, kd, mlm

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_mlm):
        d_hidden, d_weight, d_bias, student_hidden, student_weight, student_bias = ctx.saved_tensors
        kd_weight, mlm_weight = ctx.opts["kd_weight"], ctx.opts["mlm_weight"]
        coef_kd = grad_loss * kd_weight + grad_kd  # d/d kd of what is back-propagated
        coef_mlm = grad_loss * mlm_weight + grad_mlm
        grads = [d_hidden, d_weight, d_bias]
        if not kd_weight and not mlm_weight:
            scales = [grad_loss * 0]
        elif not mlm_weight:
            scales = [coef_kd / kd_weight]
        elif not kd_weight or torch.equal(coef_kd * mlm_weight, coef_mlm * kd_weight):
            scales = [coef_mlm / mlm_weight]
        else:
            # stored = kd_weight*dkd + mlm_weight*dmlm, so coef_kd*dkd + coef_mlm*dmlm
            #        = (coef_kd/kd_weight)*stored + (coef_mlm - coef_kd*mlm_weight/kd_weight)*dmlm.
            *_, m_hidden, m_weight, m_bias = _fused_pass(student_hidden, student_weight, student_bias, None, None,
                                                         None, ctx.opts, ctx.need, 0.0, 1.0)
            scales = [coef_kd / kd_weight, coef_mlm - coef_kd * (mlm_weight / kd_weight)]
            grads = [(g, m) for g, m in zip(grads, (m_hidden, m_weight, m_bias))]
        # The common backward of loss.backward(): scale 1, so the stored gradients are returned as they are
        # (one host read of the scale; no second [V, H] buffer, which autograd would then take over).
        unit = len(scales) == 1 and bool(scales[0] == 1)
        out = []
        for grad, like in zip(grads, (student_hidden, student_weight, student_bias)):
            if isinstance(grad, tuple):
                grad = None if grad[0] is None else grad[0] * scales[0] + grad[1] * scales[1]
            elif grad is not None and not unit:
                grad = grad * scales[0]
            out.append(None if grad is None else grad.to(like.dtype))
        return (*out, None, None, None, None)


def chunked_fused_linear_kd(row_kernel: RowKernel, *, student_hidden, student_weight, teacher_hidden=None,
                            teacher_weight=None, student_bias=None, teacher_bias=None, labels=None, ignore_index=-100,
                            temperature=1.0, kd_weight=1.0, mlm_weight=0.0, kind="kl", reduction="batchmean",
                            t2_scale=True, mask=None, row_weights=None, teacher_topk=None, teacher_targets=None,
                            beta=0.5,
                            chunk_rows: Optional[int] = None) -> KDOutput:
    """``kdfast.fused_linear_kd`` (validated keyword arguments) on ``row_kernel``; ``chunk_rows``
    forces the rows per chunk (default: from the shapes and free memory). ``teacher_targets``
    (ids [N, K], weights [N, K]) replace the teacher head (``kdfast/functions/sparse_targets.py``)."""
    targets = None if teacher_targets is None else SparseTargets.prepare(*teacher_targets)
    if targets is not None:
        row_weights = targets.mass if row_weights is None else targets.mass * row_weights.double()
    opts = dict(row_kernel=row_kernel, labels=labels, ignore_index=ignore_index, temperature=float(temperature),
                kd_weight=float(kd_weight), mlm_weight=float(mlm_weight), kind=kind, reduction=reduction,
                t2_scale=bool(t2_scale), mask=mask, row_weights=row_weights, teacher_topk=teacher_topk,
                beta=float(beta), teacher_targets=targets, chunk_rows=chunk_rows)
    teacher_hidden = None if teacher_hidden is None else teacher_hidden.detach()
    teacher_weight = None if teacher_weight is None else teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    loss, kd, mlm = _FusedLinearKD.apply(student_hidden, student_weight, student_bias, teacher_hidden,
                                         teacher_weight, teacher_bias, opts)
    return KDOutput(loss, kd, mlm)


# --------------------------------------------------------------------------- KD on given logits


class _KDKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, opts: dict):
        row_kernel: RowKernel = opts["row_kernel"]
        rows, vocab = student_logits.shape
        device = student_logits.device
        sel = _select(rows, vocab, device, None, -100, opts["mask"], None, opts["temperature"], 1.0, 0.0,
                      opts["reduction"], opts["t2_scale"])
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros(student_logits.shape, dtype=student_logits.dtype, device=device) if need_grad else None
        kd_sum = torch.zeros((), dtype=torch.float64, device=device)
        if sel.count:
            size = opts["chunk_rows"] or chunk_rows(sel.count, vocab, device)
            # fp32 without a mask: the kernel works directly in the gradient buffer.
            in_place = grad is not None and sel.index is None and grad.dtype == torch.float32
            vanishes = _kd_vanishes(opts)
            with workspace((1 if in_place else 2) * size * vocab, device) as chunks:
                t_buf = chunks[: size * vocab].view(size, vocab)
                s_buf = None if in_place else chunks[size * vocab:].view(size, vocab)
                for start in range(0, sel.count, size):
                    stop = min(start + size, sel.count)
                    part = slice(start, stop)
                    ids = None if sel.index is None else sel.index[part]
                    s = grad[part] if in_place else s_buf[: stop - start]
                    t = t_buf[: stop - start]
                    s.copy_(student_logits[part] if ids is None else student_logits.index_select(0, ids))
                    if vanishes:
                        t.copy_(s)  # KL(q || q) = 0, the value and gradient of the vanishing JSD
                    else:
                        t.copy_(teacher_logits[part] if ids is None else teacher_logits.index_select(0, ids))
                    kd_row, _ = row_kernel(s, t, sel.labels[part], sel.kd_coef[part], sel.mlm_coef[part],
                                           opts["temperature"], "kl" if vanishes else opts["kind"], opts["beta"])
                    kd_sum += (kd_row.double() * sel.kd_scale[part]).sum()
                    if grad is not None and not in_place:
                        if ids is None:
                            grad[part] = s
                        else:
                            grad.index_copy_(0, ids, s.to(grad.dtype))
        ctx.save_for_backward(grad)
        return kd_sum.float()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_output.to(grad.dtype)), None, None


def chunked_kd_kl(row_kernel: RowKernel, *, student_logits, teacher_logits, temperature=1.0, mask=None, kind="kl",
                  reduction="batchmean", t2_scale=True, beta=0.5, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """``kdfast.kd_kl`` (validated keyword arguments) on ``row_kernel``: a 0-dim fp32 loss."""
    opts = dict(row_kernel=row_kernel, temperature=float(temperature), mask=mask, kind=kind, reduction=reduction,
                t2_scale=bool(t2_scale), beta=float(beta), chunk_rows=chunk_rows)
    return _KDKL.apply(student_logits, teacher_logits.detach(), opts)


def unsupported_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Kernel backends decline float64 (the torch reference serves it)."""
    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return "float64 inputs are served by backend='torch' (kernel backends compute in fp32)"
    return None


def fused_unsupported_reason(**kwargs) -> Optional[str]:
    """``unsupported_reason`` for the keyword arguments of ``fused_linear_kd``."""
    return unsupported_reason(kwargs.get("student_hidden"), kwargs.get("teacher_hidden"))


def kd_kl_unsupported_reason(**kwargs) -> Optional[str]:
    """``unsupported_reason`` for the keyword arguments of ``kd_kl``."""
    return unsupported_reason(kwargs.get("student_logits"), kwargs.get("teacher_logits"))


def pointer_row_kernel(launch: Callable[..., None], with_stream: bool,
                       launch_vocab_major: Optional[Callable[..., None]] = None) -> RowKernel:
    """A row kernel from a native entry point taking raw pointers:
    ``launch(s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row, rows, vocab, ld, temperature, kind, beta[, stream])``
    (``kind`` as its index in ``KINDS``)
    for row-major ``s``, ``t`` (rows ``ld`` elements apart); ``stream``: the current CUDA stream's handle
    when ``with_stream``. ``launch_vocab_major``, with the same arguments, takes vocab-major ones
    (vocabulary entries ``ld`` elements apart) and makes the kernel ``vocab_major``."""

    def rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
             temperature: float, kind: str, beta: float = 0.5) -> "tuple[torch.Tensor, torch.Tensor]":
        row_major = s.stride(1) == 1
        kd_row, mlm_row = row_kernel_outputs(s, t, labels, kd_coef, mlm_coef, vocab_major=rows.vocab_major)
        args = [s.data_ptr(), t.data_ptr(), labels.data_ptr(), kd_coef.data_ptr(), mlm_coef.data_ptr(),
                kd_row.data_ptr(), mlm_row.data_ptr(), s.shape[0], s.shape[1], s.stride(0 if row_major else 1),
                float(temperature), KINDS.index(kind), float(beta)]
        if with_stream:
            args.append(torch.cuda.current_stream(s.device).cuda_stream)
        (launch if row_major else launch_vocab_major)(*args)
        return kd_row, mlm_row

    rows.vocab_major = launch_vocab_major is not None
    return rows


def row_kernel_outputs(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor,
                       mlm_coef: torch.Tensor, vocab_major: bool = False) -> "tuple[torch.Tensor, torch.Tensor]":
    """Check a row kernel's arguments against the contract (they go to native code as raw pointers)
    and allocate its outputs ``kd_row``, ``mlm_row`` [C] fp32. ``vocab_major``: the kernel also takes
    ``s``, ``t`` with unit stride along C."""
    rows = s.shape[0]
    if s.dtype != torch.float32 or t.dtype != torch.float32 or s.shape != t.shape or s.dim() != 2:
        raise ValueError(f"row kernel: expected fp32 s, t of one shape [C, V], got {s.dtype} {tuple(s.shape)} "
                         f"and {t.dtype} {tuple(t.shape)}")
    unit = s.stride(1) == 1 or (vocab_major and s.stride(0) == 1)
    if not unit or t.stride() != s.stride():
        expected = "unit stride along V or C" if vocab_major else "unit column stride"
        raise ValueError(f"row kernel: expected s, t with {expected} and equal strides, got {s.stride()} and "
                         f"{t.stride()}")
    for name, value, dtype in (("labels", labels, torch.int64), ("kd_coef", kd_coef, torch.float32),
                               ("mlm_coef", mlm_coef, torch.float32)):
        if value.dtype != dtype or value.shape != (rows,) or not value.is_contiguous() or value.device != s.device:
            raise ValueError(f"row kernel: {name}: expected contiguous {dtype} [{rows}] on {s.device}, got "
                             f"{value.dtype} {tuple(value.shape)} on {value.device}")
    return new_output((rows,), torch.float32, s.device), new_output((rows,), torch.float32, s.device)
