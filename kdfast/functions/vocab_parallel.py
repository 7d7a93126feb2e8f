"""Vocabulary-parallel ``fused_linear_kd``: both LM heads sharded along the vocabulary across a process group.

Rank r of the group holds rows ``[offset_r, offset_r + V_r)`` of the student's and the teacher's head
(``[V_r, H]`` weights, ``[V_r]`` biases; shards may be uneven but must split V the same way for both
models, in rank order). Hidden states, labels, mask and row weights are the same on every rank (as in
tensor parallelism). Per chunk of C selected rows each rank computes its logits ``[C, V_r]`` in fp32 with
the chunked driver's head products (``kdfast/functions/vocab_kd.py``), maps softcapped or rescaled heads'
logits, and runs the backend's row kernel on them plus two virtual columns that stand for the other
ranks' vocabulary (``kdfast/functions/vocab_shard_rows.py``). The row statistics cross ranks in
all-reduces of ``[k, C]`` tensors only (DESIGN.md, "Many devices"):

1. max of the student and teacher logits: one all-reduce(max) of ``[2, C]`` fp32;
2. the softmax sums of a = s/T, b = t/T (and of raw s when T != 1 and rows have labels), the label logit
   (owned by one rank) and, for reverse KL and JSD, b at the student's argmax: one all-reduce(sum) of
   ``[k <= 6, C]`` fp64;
3. reverse KL and JSD: the shard's Σ q (D - D_ref), which sets the virtual columns: one all-reduce(sum)
   of ``[C]``;
4. after the kernel, its divergence rows less the virtual columns' terms: one all-reduce(sum) of ``[C]``;

plus, with ``teacher_topk``, an all-gather of each row's local top-k teacher logits ``[C, min(k, V_r)]``
(the global k-th value is the k-th of the merged candidates) and, once per call, an all-gather of the
three shard sizes and an all-reduce(sum) of d_hidden ``[N, H]`` (the hidden states feed every shard).
So a call moves O(N) bytes of statistics (O(N·k·P) with top-k) and O(N·H) of gradient: nothing grows
with V, and no logits, weights or ``[N, V]`` tensor ever cross the wire. Each rank keeps the gradient of
its own head shard.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from kdfast import _checks as check
from kdfast._buffers import workspace
from kdfast._reduction import kd_term
from kdfast.functions.logit_map import LogitMap
from kdfast.functions.outputs import KDOutput
from kdfast.functions.vocab_kd.chunking import chunk_rows, chunk_view
from kdfast.functions.vocab_kd.gradients import add_chunk_grads, pass_buffers, scale_stored_grads
from kdfast.functions.vocab_kd.head import Head
from kdfast.functions.vocab_kd.options import VocabKDOptions
from kdfast.functions.vocab_kd.row_kernels import RowKernel
from kdfast.functions.vocab_kd.selection import select_rows
from kdfast.functions.vocab_shard_rows import shard_chunk
from kdfast.runtime.distributed import dtensor_api, is_dtensor

# --------------------------------------------------------------------------- communication record


@dataclass
class Traffic:
    """Collectives issued by vocabulary-parallel calls while :func:`record_traffic` is active.

    ``bytes[name]`` is the payload each rank contributes (all-reduce: the tensor; all-gather: its own
    part), summed over ``calls[name]`` collectives; a ring all-reduce puts about 2·(P-1)/P times that on
    each rank's link."""

    calls: "dict[str, int]" = field(default_factory=dict)
    bytes: "dict[str, int]" = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.bytes[name] = self.bytes.get(name, 0) + tensor.numel() * tensor.element_size()


_RECORDERS: "list[Traffic]" = []


@contextlib.contextmanager
def record_traffic() -> Iterator[Traffic]:
    """Within the block, every collective of a vocabulary-parallel ``fused_linear_kd`` (forward and
    backward) is counted into the yielded :class:`Traffic`, by collective name."""
    traffic = Traffic()
    _RECORDERS.append(traffic)
    try:
        yield traffic
    finally:
        _RECORDERS.remove(traffic)


# --------------------------------------------------------------------------- the shards of one call


@dataclass
class ShardedHeads:
    """This rank's view of the two vocabulary-sharded heads (validated by ``kdfast.losses.vocab``)."""

    group: dist.ProcessGroup
    sizes: "list[int]"   # V_r of every rank of the group, in rank order (the same for student and teacher)
    rank: int            # this process's rank in ``group``
    max_chunk_rows: int  # the smallest per-rank chunk bound: every rank runs the same chunks

    @property
    def vocab(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp, name: str) -> torch.Tensor:
        for traffic in _RECORDERS:
            traffic.add(name, tensor)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, name: str) -> "list[torch.Tensor]":
        for traffic in _RECORDERS:
            traffic.add(name, tensor)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts


def _group_of(name: str, value: torch.Tensor) -> dist.ProcessGroup:
    """The process group along which DTensor ``value`` is sharded by rows (placement Shard(0) on one mesh
    dimension, Replicate on the others)."""
    api = dtensor_api()
    placements = tuple(value.placements)
    sharded = [d for d, p in enumerate(placements) if isinstance(p, api.Shard) and p.dim == 0]
    others_replicated = all(isinstance(p, api.Replicate) for d, p in enumerate(placements) if d not in sharded)
    if len(sharded) != 1 or not others_replicated:
        raise ValueError(f"{name}: expected a DTensor with placement Shard(0) (vocabulary rows) on one mesh "
                         f"dimension and Replicate on the others, got placements {placements}")
    return value.device_mesh.get_group(sharded[0])


def _check_group(group: object) -> dist.ProcessGroup:
    """``process_group`` as given: a group of an initialised torch.distributed that holds this process."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: expected a group of an initialised torch.distributed "
                         "(torch.distributed.init_process_group first), got torch.distributed not initialised")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on the ranks it leaves out
        raise ValueError(f"process_group: expected a process group that contains this process (global rank "
                         f"{dist.get_rank()}), got dist.new_group's placeholder for a rank outside the group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup (dist.group.WORLD, "
                        f"dist.new_group(...), mesh.get_group()), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"process_group: expected a process group that contains this process (global rank "
                         f"{dist.get_rank()}), got a group of ranks {dist.get_process_group_ranks(group)}")
    return group


def shard_heads(student_weight: object, teacher_weight: object, student_bias: object, teacher_bias: object,
                process_group: object, student_hidden: object = None,
                teacher_hidden: object = None) -> "Optional[tuple[ShardedHeads, dict]]":
    """None when the heads are not sharded (no DTensor head and no ``process_group``); else the shards
    and the local tensors that replace the arguments (``student_weight`` [V_r, Hs], ..., and the local
    parts of DTensor hidden states, which must be replicated).

    Raises before any work: a mix of sharded and unsharded heads, a group without this process, shards
    that do not split one V the same way for student and teacher. The shard sizes are gathered from
    every rank with the rows and whether d hidden is wanted (one all-gather of 5 integers), so every rank
    raises the same error, also for hidden states that differ in rows or requires_grad between ranks (their
    collectives would not match)."""
    heads = dict(student_weight=student_weight, teacher_weight=teacher_weight, student_bias=student_bias,
                 teacher_bias=teacher_bias)
    given = {name: value for name, value in heads.items() if value is not None}
    distributed = {name for name, value in given.items() if is_dtensor(value)}
    if not distributed and process_group is None:
        return None
    if teacher_weight is None:
        raise ValueError("teacher_weight: expected the teacher's vocabulary shard with sharded heads (sparse "
                         "teacher_targets are not supported with vocabulary-parallel heads), got None")
    if distributed and distributed != set(given):
        plain = ", ".join(sorted(set(given) - distributed))
        raise ValueError(f"{plain}: expected DTensors sharded like {', '.join(sorted(distributed))} (a mix of "
                         f"sharded and unsharded heads is ambiguous; give every head as a DTensor with Shard(0), "
                         f"or every head as this rank's plain shard with process_group=), got a plain tensor")
    group = _common_group(given, distributed, process_group)
    local = {name: (value.to_local() if name in distributed else value) for name, value in given.items()}
    for name in ("student_weight", "teacher_weight"):
        check.tensor(name, local[name], ndim=2)
    local.update(_replicated_hidden(student_hidden=student_hidden, teacher_hidden=teacher_hidden))
    return _gathered_shards(group, local, local.get("student_hidden", student_hidden)), local


def _common_group(given: dict, distributed: "set[str]", process_group: object) -> dist.ProcessGroup:
    """``process_group`` (checked), else the group the DTensor heads are sharded over; every DTensor head
    must be sharded over it."""
    groups = {name: _group_of(name, given[name]) for name in sorted(distributed)}
    group = _check_group(process_group) if process_group is not None else next(iter(groups.values()))
    for name, other in groups.items():
        if other != group:
            first = "process_group" if process_group is not None else next(iter(groups))
            raise ValueError(f"{name}: expected a DTensor sharded over the group of {first}, got another "
                             f"process group")
    return group


def _replicated_hidden(**hidden: object) -> dict:
    """The local tensors of DTensor hidden states, which must be replicated on every rank, by name."""
    local = {}
    for name, value in hidden.items():
        if is_dtensor(value):
            if not all(isinstance(p, dtensor_api().Replicate) for p in value.placements):
                raise ValueError(f"{name}: expected hidden states replicated on every rank of the group (a plain "
                                 f"tensor or a DTensor with Replicate placements), got placements "
                                 f"{tuple(value.placements)}")
            local[name] = value.to_local()
    return local


def _gathered_shards(group: dist.ProcessGroup, local: dict, hidden: object) -> ShardedHeads:
    """The shards of every rank, from one all-gather of (V_r of both heads, the chunk bound, N, whether d
    hidden is wanted); raises the same error on every rank where they do not fit together."""
    s_rows, t_rows = (int(local[name].shape[0]) for name in ("student_weight", "teacher_weight"))
    device = local["student_weight"].device
    bound = chunk_rows(2**62, 2 * max(s_rows, 1), device)  # rows of four [C, V_r] chunks in the chunk budget
    rows = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 else -1
    wants_grad = isinstance(hidden, torch.Tensor) and hidden.requires_grad and torch.is_grad_enabled()
    mine = torch.tensor([s_rows, t_rows, bound, rows, int(wants_grad)], dtype=torch.int64)
    backend_device = device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    shards = ShardedHeads(group=group, sizes=[], rank=dist.get_rank(group), max_chunk_rows=bound)
    table = torch.stack([part.cpu() for part in shards.all_gather(mine.to(backend_device), "all_gather(sizes)")])
    student_sizes, teacher_sizes = table[:, 0].tolist(), table[:, 1].tolist()
    if student_sizes != teacher_sizes or min(student_sizes) < 1:
        raise ValueError(f"student_weight, teacher_weight: expected vocabulary shards of both heads that add up to "
                         f"the same V, split the same way over the {len(student_sizes)} ranks (at least one row "
                         f"each), got student shards {student_sizes} (V={sum(student_sizes)}) and teacher shards "
                         f"{teacher_sizes} (V={sum(teacher_sizes)})")
    # every rank must run the same chunks and collectives: the same rows, and d hidden wanted on all or none
    for column, name, what in ((3, "student_hidden", "the same N rows"),
                               (4, "student_hidden", "requires_grad (under grad mode) the same")):
        if len(set(table[:, column].tolist())) > 1:
            raise ValueError(f"{name}: expected {what} on every rank of the group (hidden states are replicated), "
                             f"got {table[:, column].tolist()} by rank")
    shards.sizes, shards.max_chunk_rows = student_sizes, int(table[:, 2].min())
    return shards


# --------------------------------------------------------------------------- one chunk


def _keep_global_topk(t: torch.Tensor, k: int, shards: ShardedHeads) -> None:
    """Set every teacher logit below its row's k-th largest over the whole vocabulary to -inf (in place),
    from an all-gather of each rank's local top min(k, V_r) logits per row (-inf padded to a common width)."""
    width = min(k, max(shards.sizes))
    local = torch.topk(t, min(k, t.shape[1]), dim=1, sorted=False).values
    if local.shape[1] < width:
        local = torch.cat([local, local.new_full((t.shape[0], width - local.shape[1]), float("-inf"))], dim=1)
    candidates = torch.cat(shards.all_gather(local, "all_gather(topk)"), dim=1)
    kth = torch.topk(candidates, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    t.masked_fill_(t < kth, float("-inf"))


@dataclass
class _Chunks:
    """The per-chunk buffers of a pass, as views of one workspace: ``s``, ``t`` [C, V_r + 2] (the logits
    and two virtual columns), ``u`` [C, V_r], ``w`` (reverse KL, JSD) and ``slope`` (a softcapped student) or None."""

    count: int         # buffers in the workspace
    size: int          # rows per chunk
    width: int         # V_r + 2
    vocab_major: bool

    @classmethod
    def plan(cls, kind: Optional[str], capped: bool, rows: int, local_vocab: int, shards: ShardedHeads,
             forced: Optional[int], vocab_major: bool) -> "_Chunks":
        count = 3 + (kind in ("reverse_kl", "jsd")) + capped
        # every rank takes the same rows per chunk: the shared bound is sized for 4 chunks of V_r
        size = forced or min(rows, shards.max_chunk_rows, max(1, shards.max_chunk_rows * 4 // count))
        return cls(count, size, local_vocab + 2, vocab_major)

    def views(self, flat: torch.Tensor, rows: int, kind: Optional[str], capped: bool) -> dict:
        step = self.size * self.width
        ext = [chunk_view(flat[i * step:], rows, self.width, self.vocab_major) for i in range(self.count)]
        local = self.width - 2
        scratch_w = kind in ("reverse_kl", "jsd")
        return dict(s=ext[0], t=ext[1], u=ext[2][:, :local], w=ext[3][:, :local] if scratch_w else None,
                    slope=ext[-1][:, :local] if capped else None,
                    scratch=flat[step: step + rows * local])  # the spent t chunk, flat (bf16 gradient split)


# --------------------------------------------------------------------------- the pass and the entry point


def _sharded_pass(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  opts: VocabKDOptions, shards: "ShardedHeads", need: "tuple[bool, bool, bool]", kd_weight: float,
                  mlm_weight: float):
    """``vocab_kd.fused_pass.fused_pass`` on this rank's vocabulary shard: (kd [0-dim fp64], mlm, d_hidden [N, Hs]
    (all-reduced: the whole gradient), d_weight [V_r, Hs], d_bias [V_r]), gradients None where not needed."""
    local_vocab, device = student_weight.shape[0], student_hidden.device
    sel = select_rows(student_hidden.shape[0], shards.vocab, device, opts.labels, opts.ignore_index, opts.mask,
                      opts.row_weights, opts.temperature, kd_weight, mlm_weight, opts.reduction, opts.t2_scale)
    d_hidden, d_weight, d_bias, kd_sum, mlm_sum = pass_buffers(student_hidden, student_weight, need)
    if not sel.count:
        if d_weight is not None:
            d_weight.zero_()
        return kd_sum, mlm_sum, d_hidden, d_weight, d_bias
    kind = opts.kind if kd_weight != 0 else None  # None: no KD term
    topk, kernel = opts.teacher_topk, opts.row_kernel
    student_map, teacher_map = opts.student_map, opts.teacher_map
    with_labels = bool((sel.labels >= 0).any())
    student = Head(student_weight, student_bias)
    teacher = Head(teacher_weight, teacher_bias) if kind is not None else None
    vocab_major = getattr(kernel, "vocab_major", False) and not student.native16 and not (
        teacher is not None and teacher.native16)
    plan = _Chunks.plan(kind, student_map.needs_slope, sel.count, local_vocab, shards, opts.chunk_rows, vocab_major)
    with workspace(plan.count * plan.size * plan.width, device) as flat:
        for start in range(0, sel.count, plan.size):
            stop = min(start + plan.size, sel.count)
            part = slice(start, stop)
            ids = None if sel.index is None else sel.index[part]
            x_s = student_hidden[part] if ids is None else student_hidden.index_select(0, ids)
            bufs = plan.views(flat, stop - start, kind, student_map.needs_slope)
            s = bufs["s"][:, :local_vocab]
            student.logits_into(s, x_s)
            student_map.apply_(s, bufs["slope"])
            if kind is not None:
                t = bufs["t"][:, :local_vocab]
                teacher.logits_into(t, teacher_hidden[part] if ids is None else teacher_hidden.index_select(0, ids))
                teacher_map.apply_(t)
                if topk is not None and topk < shards.vocab:
                    _keep_global_topk(t, topk, shards)
            kd_row, mlm_row = shard_chunk(kernel, bufs["s"], bufs["t"], bufs["u"], bufs["w"], sel.labels[part],
                                          sel.kd_coef[part], sel.mlm_coef[part], opts.temperature, kind,
                                          opts.beta, with_labels, shards)
            kd_sum += (kd_row * sel.kd_scale[part]).sum()
            mlm_sum += mlm_row.sum()
            # s now holds d loss / d logits of this shard's chunk; t is spent.
            student_map.backward_(s, bufs["slope"])
            add_chunk_grads(student, s, bufs["scratch"], x_s, part, ids, start == 0, d_hidden, d_weight, d_bias)
    if d_hidden is not None:
        shards.all_reduce(d_hidden, dist.ReduceOp.SUM, "all_reduce(d_hidden)")
    return kd_sum, mlm_sum / sel.mlm_divisor, d_hidden, d_weight, d_bias


class _ShardedFusedLinearKD(torch.autograd.Function):
    """Forward: ``_sharded_pass`` (loss parts and the gradients of ``kd_weight*kd + mlm_weight*mlm``);
    backward: ``scale_stored_grads`` (re-weighted parts recompute the MLM gradients with one more pass)."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                opts: VocabKDOptions, shards: "ShardedHeads", kd_weight: float, mlm_weight: float):
        need = tuple(ctx.needs_input_grad[:3])
        kd, mlm, *grads = _sharded_pass(student_hidden, student_weight, student_bias, teacher_hidden,
                                        teacher_weight, teacher_bias, opts, shards, need, kd_weight, mlm_weight)
        kd = (kd if kd_weight != 0 else kd * 0).float()
        mlm = (mlm if mlm_weight != 0 else mlm * 0).float()
        ctx.opts, ctx.shards, ctx.need, ctx.weights = opts, shards, need, (kd_weight, mlm_weight)
        ctx.save_for_backward(*grads, student_hidden, student_weight, student_bias)
        return kd_weight * kd + mlm_weight * mlm, kd, mlm

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_mlm):
        *stored, hidden, weight, bias = ctx.saved_tensors
        kd_weight, mlm_weight = ctx.weights

        def mlm_grads():
            return _sharded_pass(hidden, weight, bias, None, None, None, ctx.opts, ctx.shards, ctx.need, 0.0, 1.0)[2:]

        grads = scale_stored_grads(grad_loss * kd_weight + grad_kd, grad_loss * mlm_weight + grad_mlm,
                                   stored, kd_weight, mlm_weight, mlm_grads)
        out = [None if g is None else g.to(like.dtype) for g, like in zip(grads, (hidden, weight, bias))]
        return (*out, None, None, None, None, None, None, None)


def fused_linear_kd(shards: ShardedHeads, row_kernel: RowKernel, *, student_hidden, student_weight, teacher_hidden,
                    teacher_weight, student_bias=None, teacher_bias=None, labels=None, ignore_index=-100,
                    temperature=1.0, kd_weight=1.0, mlm_weight=0.0, kind="kl", reduction="batchmean", t2_scale=True,
                    mask=None, row_weights=None, teacher_topk=None, teacher_targets=None, beta=0.5,
                    student_softcap=None, student_logit_scale=1.0, teacher_softcap=None,
                    teacher_logit_scale=1.0) -> KDOutput:
    """``kdfast.fused_linear_kd`` (validated keyword arguments, local shards) on vocabulary-sharded heads, each
    shard's chunks on ``row_kernel`` (the row kernel of the backend that serves the call, contract in
    ``kdfast/functions/vocab_kd.py``). ``teacher_targets`` is refused earlier (``shard_heads``)."""
    if kd_term(kind, beta) == "reverse_kl" and teacher_topk is not None and teacher_topk < shards.vocab:
        raise ValueError(f"teacher_topk: expected None with kind={kind!r}, beta={beta} (reverse KL: KL(q || p) is "
                         f"infinite where the top-k teacher has p = 0), got {teacher_topk}")
    opts = VocabKDOptions(row_kernel=row_kernel, labels=labels, ignore_index=ignore_index,
                          temperature=float(temperature), kind=kd_term(kind, beta), reduction=reduction,
                          t2_scale=bool(t2_scale), mask=mask, row_weights=row_weights, teacher_topk=teacher_topk,
                          beta=float(beta), student_map=LogitMap(student_softcap, student_logit_scale),
                          teacher_map=LogitMap(teacher_softcap, teacher_logit_scale))
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    loss, kd, mlm = _ShardedFusedLinearKD.apply(student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                                                teacher_weight.detach(), teacher_bias, opts, shards, float(kd_weight),
                                                float(mlm_weight))
    return KDOutput(loss, kd, mlm)
