"""The chunked vocabulary-KD driver shared by every kernel backend (cpu, cuda, triton); the custom
ops of ``kdfast/ops/vocab.py`` run it.

``_fused_pass`` (op ``fused_linear_kd``): per chunk of C selected rows (rows with a label, or kept by
``mask``), the teacher and student logits [C, V] are computed in fp32 by torch matmuls, a backend *row
kernel* turns the student logits into d loss / d logits in place, and the gradients of the student
hidden states, weight and bias are accumulated in fp32. The op's backward only scales them.
Extra memory is O(C x V) for the two logit chunks plus the fp32 gradients; nothing [N, V] exists.

``kd_kl_pass`` (op ``kd_kl``): the same row kernel on given logits (no matmuls); its gradient buffer
is [N, V] like the input.

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
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from kdfast._buffers import new_output, workspace
from kdfast._reduction import KINDS, kd_divisor, kd_factor, mlm_divisor
from kdfast.functions.logit_map import LogitMap
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


def chunk_rows(rows: int, vocab: int, device: torch.device, buffers: int = 2) -> int:
    """Rows per chunk so ``buffers`` fp32 chunks [C, V] (teacher and student logits, and a softcapped
    student's dz/du) fit the memory budget: the smaller of ``CUDA_CHUNK_BYTES`` (CUDA) or, on CPU,
    ``CPU_CHUNK_BYTES`` raised to hold ``CPU_MIN_CHUNK_ROWS`` rows, and a quarter of free memory, both
    sized for two chunks and scaled by buffers / 2. Independent of the number of rows.
    ``KDFAST_VOCAB_CHUNK_ROWS`` overrides it (for experiments)."""
    forced = os.environ.get("KDFAST_VOCAB_CHUNK_ROWS")
    if forced:
        return max(1, min(rows, int(forced)))
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else max(CPU_CHUNK_BYTES, 2 * CPU_MIN_CHUNK_ROWS * vocab * 4)
    free = _free_bytes(device)
    if free is not None:
        budget = min(budget, free // 4)
    return rows_within(rows, vocab, budget * 2 // buffers, buffers)


def rows_within(rows: int, vocab: int, budget: int, buffers: int = 2) -> int:
    """Rows per chunk (a multiple of 16, at least 16, at most ``rows``) whose ``buffers`` fp32 [C, V]
    chunks fit ``budget`` bytes: fewer rows for a larger vocabulary, the same bytes."""
    chunk = max(16, (budget // (buffers * vocab * 4)) // 16 * 16)
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


def pass_buffers(hidden: torch.Tensor, weight: torch.Tensor, need: "tuple[bool, bool, bool]") -> tuple:
    """A fused pass's accumulators: fp32 d_hidden [N, H] (zeros), d_weight [V, H] (unwritten: the first
    chunk overwrites it), d_bias [V] (zeros), each None unless ``need`` (hidden, weight, bias) asks for it,
    and the 0-dim fp64 kd and mlm sums."""
    device = hidden.device
    d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need[0] else None
    d_weight = torch.empty(weight.shape, dtype=torch.float32, device=device) if need[1] else None
    d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if need[2] else None
    sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(2)]
    return d_hidden, d_weight, d_bias, *sums


def add_chunk_grads(student: _Head, g: torch.Tensor, scratch: torch.Tensor, x: torch.Tensor, part: slice,
                    ids: Optional[torch.Tensor], first: bool, d_hidden: Optional[torch.Tensor],
                    d_weight: Optional[torch.Tensor], d_bias: Optional[torch.Tensor],
                    mark: Optional[Callable[[str], None]] = None) -> None:
    """Add a chunk's d loss / d logits ``g`` [C, V] fp32 (consumed; ``scratch``: a spent chunk of its
    size) into the student's gradients that are not None: d_bias [V], d_hidden [N, H] at rows ``part``
    of the selection (``ids`` [C] the row ids, None when every row is selected), d_weight [V, H] from the
    chunk's hidden states ``x`` [C, H] (``first`` overwrites it). ``mark``: the phase hook."""
    if d_bias is not None:
        d_bias += g.sum(0)
    operands = student.grad_operands(g, scratch=scratch) if d_hidden is not None or d_weight is not None else []
    if d_hidden is not None:
        if ids is None:
            student.times_weight(operands, out=d_hidden[part])
        else:
            d_hidden.index_copy_(0, ids, student.times_weight(operands, out=x.new_empty(x.shape, dtype=torch.float32)))
    if mark:
        mark("d_hidden")
    if d_weight is not None:
        student.add_weight_grad_(d_weight, operands, x, first=first)
    if mark:
        mark("d_weight")


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
    d_hidden, d_weight, d_bias, kd_sum, mlm_sum = pass_buffers(student_hidden, student_weight, need)
    if sel.count:
        with_teacher = kd_weight != 0
        targets: Optional[SparseTargets] = opts.get("teacher_targets")
        student = _Head(student_weight, student_bias)
        teacher = _Head(teacher_weight, teacher_bias) if with_teacher and targets is None else None
        student_map: LogitMap = opts.get("student_map", LogitMap())  # plain heads when a caller gives none
        teacher_map: LogitMap = opts.get("teacher_map", LogitMap())
        buffers = 3 if student_map.needs_slope else 2  # the third: the capped student's dz/du
        size = opts["chunk_rows"] or chunk_rows(sel.count, vocab, device, buffers)
        # Vocab-major chunks only for fp32 products (16-bit ones run on CUDA, where kernels are row-major).
        vocab_major = getattr(row_kernel, "vocab_major", False) and not student.native16 and not (
            teacher is not None and teacher.native16)
        mark = _PHASE_HOOK[0]
        with workspace(buffers * size * vocab, device) as chunks:
            s_buf, t_buf, slope_buf = (chunks[i * size * vocab:(i + 1) * size * vocab] for i in range(3))
            for start in range(0, sel.count, size):
                if mark:
                    mark("start")
                stop = min(start + size, sel.count)
                part = slice(start, stop)
                ids = None if sel.index is None else sel.index[part]
                x_s = student_hidden[part] if ids is None else student_hidden.index_select(0, ids)
                s, t = (_chunk_view(buf, stop - start, vocab, vocab_major) for buf in (s_buf, t_buf))
                slope = _chunk_view(slope_buf, stop - start, vocab, vocab_major) if buffers == 3 else None
                student.logits_into(s, x_s)
                student_map.apply_(s, slope)
                if mark:
                    mark("student_logits")
                if with_teacher and targets is not None:
                    targets.fill(t, part if ids is None else ids, opts["temperature"])
                elif with_teacher:
                    x_t = teacher_hidden[part] if ids is None else teacher_hidden.index_select(0, ids)
                    teacher.logits_into(t, x_t)
                    teacher_map.apply_(t)
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
                student_map.backward_(s, slope)
                add_chunk_grads(student, s, t, x_s, part, ids, start == 0, d_hidden, d_weight, d_bias, mark)
        if with_teacher and targets is not None and opts["kind"] == "kl":
            offset = targets.kl_offset()
            kd_sum += (sel.kd_scale * (offset if sel.index is None else offset[sel.index])).sum()
    if d_weight is not None and not sel.count:
        d_weight.zero_()  # no chunk wrote it
    return kd_sum, mlm_sum / sel.mlm_divisor, d_hidden, d_weight, d_bias


def scale_stored_grads(grad_kd: torch.Tensor, grad_mlm: torch.Tensor, stored: "Sequence[Optional[torch.Tensor]]",
                       kd_weight: float, mlm_weight: float,
                       mlm_grads: "Callable[[], Sequence[Optional[torch.Tensor]]]") -> list:
    """Input gradients from the incoming gradients of ``kd`` and ``mlm``, given ``stored`` = the forward's
    gradients of ``kd_weight * kd + mlm_weight * mlm``. Only when the parts are re-weighted (another ratio
    than their weights) is ``mlm_grads()`` (the MLM part's own gradients, one more pass) called. At scale 1
    the stored tensors themselves are returned (one host read of the scale; no second [V, H] buffer)."""
    if not kd_weight and not mlm_weight:
        scale = grad_kd * 0
    elif not mlm_weight:
        scale = grad_kd / kd_weight
    elif not kd_weight or torch.equal(grad_kd * mlm_weight, grad_mlm * kd_weight):
        scale = grad_mlm / mlm_weight
    else:
        # stored = kd_weight*dkd + mlm_weight*dmlm, so grad_kd*dkd + grad_mlm*dmlm
        #        = (grad_kd/kd_weight)*stored + (grad_mlm - grad_kd*mlm_weight/kd_weight)*dmlm.
        first, second = grad_kd / kd_weight, grad_mlm - grad_kd * (mlm_weight / kd_weight)
        return [g if m is None or g is None else g * first + m * second for g, m in zip(stored, mlm_grads())]
    if bool(scale == 1):
        return list(stored)
    return [None if g is None else g * scale for g in stored]


# --------------------------------------------------------------------------- KD on given logits


def kd_kl_pass(student_logits: torch.Tensor, teacher_logits: torch.Tensor, opts: dict,
               need_grad: bool) -> "tuple[torch.Tensor, Optional[torch.Tensor]]":
    """``kdfast.kd_kl`` on ``opts["row_kernel"]``: (0-dim fp32 loss, its gradient for the student
    logits in their dtype, or None without ``need_grad``)."""
    row_kernel: RowKernel = opts["row_kernel"]
    rows, vocab = student_logits.shape
    device = student_logits.device
    sel = _select(rows, vocab, device, None, -100, opts["mask"], None, opts["temperature"], 1.0, 0.0,
                  opts["reduction"], opts["t2_scale"])
    grad = torch.zeros(student_logits.shape, dtype=student_logits.dtype, device=device) if need_grad else None
    kd_sum = torch.zeros((), dtype=torch.float64, device=device)
    if sel.count:
        size = opts["chunk_rows"] or chunk_rows(sel.count, vocab, device)
        # fp32 without a mask: the kernel works directly in the gradient buffer.
        in_place = grad is not None and sel.index is None and grad.dtype == torch.float32
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
                t.copy_(teacher_logits[part] if ids is None else teacher_logits.index_select(0, ids))
                kd_row, _ = row_kernel(s, t, sel.labels[part], sel.kd_coef[part], sel.mlm_coef[part],
                                       opts["temperature"], opts["kind"], opts["beta"])
                kd_sum += (kd_row.double() * sel.kd_scale[part]).sum()
                if grad is not None and not in_place:
                    if ids is None:
                        grad[part] = s
                    else:
                        grad.index_copy_(0, ids, s.to(grad.dtype))
    return kd_sum.float(), grad


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
