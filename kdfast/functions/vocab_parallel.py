"""Vocabulary-parallel ``fused_linear_kd``: both LM heads sharded along the vocabulary across a process group.

Rank r of the group holds rows ``[offset_r, offset_r + V_r)`` of the student's and the teacher's head
(``[V_r, H]`` weights, ``[V_r]`` biases; shards may be uneven but must split V the same way for both
models, in rank order). Hidden states, labels, mask and row weights are the same on every rank (as in
tensor parallelism). Per chunk of C selected rows each rank computes its logits ``[C, V_r]`` in fp32 with
the chunked driver's head products (``kdfast/functions/vocab_kd.py``) and combines the row statistics
across ranks with all-reduces of ``[k, C]`` tensors only (DESIGN.md, "Many devices"):

1. max of the student and teacher logits: one all-reduce(max) of ``[2, C]``;
2. the softmax sums of a = s/T, b = t/T (and of raw s when T != 1 and rows have labels), the label logit
   (owned by one rank) and the divergence's partial sum (kl, soft CE, reverse KL): one all-reduce(sum)
   of ``[k <= 6, C]``;
3. JSD only: Σ p log(p/m) and Σ q log(q/m) once both logsumexps are known: one all-reduce(sum) of ``[2, C]``;

plus, with ``teacher_topk``, an all-gather of each row's local top-k teacher logits ``[C, min(k, V_r)]``
(the global k-th value is the k-th of the merged candidates) and, once per call, an all-gather of the
three shard sizes and an all-reduce(sum) of d_hidden ``[N, H]`` (the hidden states feed every shard).
So a call moves O(N) bytes of statistics (O(N·k·P) with top-k) and O(N·H) of gradient: nothing grows
with V, and no logits, weights or ``[N, V]`` tensor ever cross the wire. Each rank keeps the gradient of
its own head shard.

The per-chunk row arithmetic is torch operations on the chunk (any device, any backend): the row kernels
of the single-device driver compute each row's max and logsumexp over their own ``[C, V]`` chunk in one
fused pass and have no entry for statistics from other ranks, so they cannot serve a shard.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from kdfast import _backends
from kdfast import _checks as check
from kdfast._buffers import workspace
from kdfast._reduction import kd_term
from kdfast.functions.outputs import KDOutput
from kdfast.functions.vocab_kd.chunking import chunk_rows
from kdfast.functions.vocab_kd.chunking import chunk_view as _chunk_view
from kdfast.functions.vocab_kd.gradients import add_chunk_grads, pass_buffers, scale_stored_grads
from kdfast.functions.vocab_kd.head import Head as _Head
from kdfast.functions.vocab_kd.selection import select_rows as _select

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


def _is_dtensor(value: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _group_of(name: str, value: torch.Tensor) -> dist.ProcessGroup:
    """The process group along which DTensor ``value`` is sharded by rows (placement Shard(0) on one mesh
    dimension, Replicate on the others)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(value.placements)
    sharded = [d for d, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    others_replicated = all(isinstance(p, Replicate) for d, p in enumerate(placements) if d not in sharded)
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
    distributed = {name for name, value in given.items() if _is_dtensor(value)}
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
    groups = {name: _group_of(name, given[name]) for name in sorted(distributed)}
    if process_group is not None:
        group = _check_group(process_group)
    elif groups:
        group = next(iter(groups.values()))
    for name, other in groups.items():
        if other != group:
            first = "process_group" if process_group is not None else next(iter(groups))
            raise ValueError(f"{name}: expected a DTensor sharded over the group of {first}, got another "
                             f"process group")
    local = {name: (value.to_local() if name in distributed else value) for name, value in given.items()}
    for name in ("student_weight", "teacher_weight"):
        check.tensor(name, local[name], ndim=2)
    for name, hidden in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if _is_dtensor(hidden):
            from torch.distributed.tensor import Replicate

            if not all(isinstance(p, Replicate) for p in hidden.placements):
                raise ValueError(f"{name}: expected hidden states replicated on every rank of the group (a plain "
                                 f"tensor or a DTensor with Replicate placements), got placements "
                                 f"{tuple(hidden.placements)}")
            local[name] = hidden.to_local()
    s_rows, t_rows = (int(local[name].shape[0]) for name in ("student_weight", "teacher_weight"))
    device = local["student_weight"].device
    bound = chunk_rows(2**62, 2 * max(s_rows, 1), device)
    hidden = local.get("student_hidden", student_hidden)
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
    return shards, local


# --------------------------------------------------------------------------- kinds


def check_plain_heads(student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale) -> None:
    """Softcapped or rescaled heads are not served vocabulary-parallel yet: refused by name."""
    given = (("student_softcap", student_softcap, None), ("student_logit_scale", student_logit_scale, 1.0),
             ("teacher_softcap", teacher_softcap, None), ("teacher_logit_scale", teacher_logit_scale, 1.0))
    for name, value, plain in given:
        if value != plain:
            raise ValueError(f"{name}: expected {plain} with vocabulary-parallel heads (softcapped or rescaled heads "
                             f"run on unsharded heads only), got {value!r}")


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


def _chunk_rows(s: torch.Tensor, t: Optional[torch.Tensor], u: torch.Tensor, labels: torch.Tensor,
                kd_coef: torch.Tensor, mlm_coef: torch.Tensor, temperature: float, kind: str, beta: float,
                with_labels: bool, with_raw: bool, shards: ShardedHeads) -> "tuple[torch.Tensor, torch.Tensor]":
    """The row kernel contract (``kdfast/functions/vocab_kd.py``) on a vocabulary shard: ``s``, ``t``
    [C, V_r] fp32 local logits (``t`` None: no KD term), ``u`` scratch of their shape; statistics
    combined across the group. ``s`` becomes d loss / d s of this shard (``t``, ``u`` are spent); returns
    ``kd_row``, ``mlm_row`` [C] fp64, the same on every rank. ``with_labels``: some rows of the call have a
    label; ``with_raw``: the softmax of raw s is needed apart from that of s / T (T != 1 and labelled rows).
    A call passes the same flags for all its chunks, so every rank sends statistics of the same heights.
    Working memory: ``s``, ``t``, ``u``, q and, for JSD, one more chunk."""
    T = temperature
    top = torch.stack([s.amax(1)] + ([] if t is None else [t.amax(1)]))
    top = shards.all_reduce(top, dist.ReduceOp.MAX, "all_reduce(max)")
    s.sub_(top[0, :, None]).div_(T)  # a' = a - max a <= 0, a = s / T
    column = labels - shards.offset
    owned = (labels >= 0) & (column >= 0) & (column < s.shape[1])
    q = torch.exp(s)
    sums = [q.sum(1)]
    if with_labels:  # the label's raw logit minus the max, from the rank that holds it
        sums.append(torch.where(owned, s.gather(1, column.clamp(0, s.shape[1] - 1)[:, None]).squeeze(1) * T, 0.0))
    if with_raw:
        sums.append(torch.mul(s, T, out=u).exp_().sum(1))  # Σ exp(s - max s)
    if t is not None:
        t.sub_(top[1, :, None]).div_(T)  # b' = b - max b (-inf off the top-k)
        sums.append(torch.exp(t, out=u).sum(1))  # u = exp(b')
        if kind == "kl":  # Σ exp(b') (b' - a'), 0 off the top-k (0 * -inf)
            sums.append(t.sub_(s).mul_(u).nan_to_num_(nan=0.0).sum(1))
        elif kind == "soft_ce":
            sums.append(torch.mul(u, s, out=t).sum(1))
        else:  # b' at the student's argmax (a' = 0), averaged over the ranks holding one: see _divergence
            local_top, at = s.max(1)
            holds = local_top == 0
            sums += [holds.float(), torch.where(holds, t.gather(1, at[:, None]).squeeze(1), 0.0)]
    sums = shards.all_reduce(torch.stack(sums).double(), dist.ReduceOp.SUM, "all_reduce(sum)")
    z_a, rest = sums[0], list(sums[1:])
    log_za = z_a.log()
    label_logit = rest.pop(0) if with_labels else None
    log_zs = rest.pop(0).log() if with_raw else log_za
    mlm_row = torch.where(labels >= 0, log_zs - label_logit, 0.0) if with_labels else torch.zeros_like(log_za)
    q.div_(z_a.float()[:, None])
    kd_row, grad_kd = torch.zeros_like(log_za), None
    if t is not None:
        z_b = rest.pop(0)
        log_zb = z_b.log()
        if kind in ("kl", "soft_ce"):
            kd_row = rest[0] / z_b - log_zb + log_za if kind == "kl" else -rest[0] / z_b + log_za
            grad_kd = torch.sub(q, u.div_(z_b.float()[:, None]), out=t)  # q - p
        else:
            kd_row, grad_kd = _divergence(s, t, u, q, log_za, log_zb, rest[1] / rest[0], kind, beta, shards)
    # d loss / d s = kd_coef * grad_kd + mlm_coef * (softmax(s) - onehot(label)), written into s
    raw = torch.mul(s, T, out=u).sub_(log_zs.float()[:, None]).exp_() if with_raw else q
    torch.mul(raw, mlm_coef[:, None], out=s)
    if grad_kd is not None:
        s.addcmul_(grad_kd, kd_coef[:, None])
    mine = owned.nonzero().squeeze(1)
    s[mine, column[mine]] -= mlm_coef[mine]
    return kd_row, mlm_row


def _divergence(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, q: torch.Tensor, log_za: torch.Tensor,
                log_zb: torch.Tensor, b_ref: torch.Tensor, kind: str, beta: float,
                shards: ShardedHeads) -> "tuple[torch.Tensor, torch.Tensor]":
    """Reverse KL or JSD_beta of the rows [C] fp64 and d/da [C, V_r] (returned in ``b`` or a new chunk),
    as the C++ kernel forms them (csrc/vocab_kd_math.h): with D = log q - log p (reverse KL) or
    log q - log m (JSD), the gradient w q (D - Σ q D) is computed as w q (delta - k) with delta = D - D_ref
    relative to the student's argmax and k = Σ q delta (one more all-reduce), so a near one-hot student
    keeps its small gradient without a difference of two large numbers. ``a``, ``b``: logits / T minus
    the row's max (``a`` is kept, ``b`` and the scratch ``u`` are spent), ``b_ref`` the teacher's at the
    student's argmax; ``u`` holds exp(b) on entry."""
    if kind == "reverse_kl":
        delta = b.sub_(a).neg_().add_(b_ref.float()[:, None])  # a' - (b' - b'_ref)
        sums = [torch.mul(q, delta, out=u).sum(1)]
        d_ref, weight = -log_za - (b_ref - log_zb), 1.0
    else:
        shift = math.log(beta / (1 - beta))
        z = b.sub_(a).add_((log_za - log_zb + shift).float()[:, None])  # log p - log q + shift; -inf where p = 0
        p = u.mul_((-log_zb).exp().float()[:, None])
        p_term = torch.nn.functional.softplus(z.neg_()).neg_().sub_(math.log(beta))  # log p - log m
        p_term = p_term.mul_(p).nan_to_num_(nan=0.0).sum(1)  # 0 where p = 0 (0 * -inf)
        sp_ref = torch.nn.functional.softplus(b_ref - log_zb + log_za + shift)
        delta = torch.nn.functional.softplus(z.neg_()).neg_().add_(sp_ref.float()[:, None])
        sums = [torch.mul(q, delta, out=u).sum(1), p_term]
        d_ref, weight = -math.log1p(-beta) - sp_ref, 1 - beta
    sums = shards.all_reduce(torch.stack(sums).double(), dist.ReduceOp.SUM, "all_reduce(sum)")
    k = sums[0]
    kd_row = d_ref + k if kind == "reverse_kl" else beta * sums[1] + weight * (d_ref + k)
    return kd_row, delta.sub_(k.float()[:, None]).mul_(q).mul_(weight)


# --------------------------------------------------------------------------- the pass and the entry point


def _sharded_pass(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  opts: dict, need: "tuple[bool, bool, bool]", kd_weight: float, mlm_weight: float):
    """``vocab_kd._fused_pass`` on this rank's vocabulary shard: (kd [0-dim fp64], mlm, d_hidden [N, Hs]
    (all-reduced: the whole gradient), d_weight [V_r, Hs], d_bias [V_r]), gradients None where not needed."""
    shards: ShardedHeads = opts["shards"]
    rows, local_vocab = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    sel = _select(rows, shards.vocab, device, opts["labels"], opts["ignore_index"], opts["mask"],
                  opts["row_weights"], opts["temperature"], kd_weight, mlm_weight, opts["reduction"], opts["t2_scale"])
    d_hidden, d_weight, d_bias, kd_sum, mlm_sum = pass_buffers(student_hidden, student_weight, need)
    if not sel.count:
        if d_weight is not None:
            d_weight.zero_()
        return kd_sum, mlm_sum, d_hidden, d_weight, d_bias
    kind, topk = kd_term(opts["kind"], opts["beta"]), opts["teacher_topk"]
    with_teacher = kd_weight != 0
    with_labels = bool((sel.labels >= 0).any())
    with_raw = with_labels and opts["temperature"] != 1
    student = _Head(student_weight, student_bias)
    teacher = _Head(teacher_weight, teacher_bias) if with_teacher else None
    size = opts["chunk_rows"] or min(sel.count, shards.max_chunk_rows)
    # fp32 products fill vocab-major chunks, as the single-device driver on CPU: the same logits, bit for bit
    vocab_major = not student.native16 and not (teacher is not None and teacher.native16)
    with workspace(3 * size * local_vocab, device) as chunks:
        for start in range(0, sel.count, size):
            stop = min(start + size, sel.count)
            part = slice(start, stop)
            ids = None if sel.index is None else sel.index[part]
            x_s = student_hidden[part] if ids is None else student_hidden.index_select(0, ids)
            s, t, u = (_chunk_view(chunks[i * size * local_vocab:], stop - start, local_vocab, vocab_major)
                       for i in range(3))
            student.logits_into(s, x_s)
            if with_teacher:
                teacher.logits_into(t, teacher_hidden[part] if ids is None else teacher_hidden.index_select(0, ids))
                if topk is not None and topk < shards.vocab:
                    _keep_global_topk(t, topk, shards)
            kd_row, mlm_row = _chunk_rows(s, t if with_teacher else None, u, sel.labels[part], sel.kd_coef[part],
                                          sel.mlm_coef[part], opts["temperature"], kind, opts["beta"],
                                          with_labels, with_raw, shards)
            kd_sum += (kd_row * sel.kd_scale[part]).sum()
            mlm_sum += mlm_row.sum()
            # s now holds d loss / d logits of this shard's chunk; t is spent.
            add_chunk_grads(student, s, t, x_s, part, ids, start == 0, d_hidden, d_weight, d_bias)
    if d_hidden is not None:
        shards.all_reduce(d_hidden, dist.ReduceOp.SUM, "all_reduce(d_hidden)")
    return kd_sum, mlm_sum / sel.mlm_divisor, d_hidden, d_weight, d_bias


class _ShardedFusedLinearKD(torch.autograd.Function):
    """Forward: ``_sharded_pass`` (loss parts and the gradients of ``kd_weight*kd + mlm_weight*mlm``);
    backward: ``scale_stored_grads`` (re-weighted parts recompute the MLM gradients with one more pass)."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                opts: dict):
        kd_weight, mlm_weight = opts["kd_weight"], opts["mlm_weight"]
        need = tuple(ctx.needs_input_grad[:3])
        kd, mlm, *grads = _sharded_pass(student_hidden, student_weight, student_bias, teacher_hidden,
                                        teacher_weight, teacher_bias, opts, need, kd_weight, mlm_weight)
        kd = (kd if kd_weight != 0 else kd * 0).float()
        mlm = (mlm if mlm_weight != 0 else mlm * 0).float()
        ctx.opts, ctx.need = opts, need
        ctx.save_for_backward(*grads, student_hidden, student_weight, student_bias)
        return kd_weight * kd + mlm_weight * mlm, kd, mlm

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_mlm):
        *stored, hidden, weight, bias = ctx.saved_tensors
        opts = ctx.opts

        def mlm_grads():
            return _sharded_pass(hidden, weight, bias, None, None, None, opts, ctx.need, 0.0, 1.0)[2:]

        grads = scale_stored_grads(grad_loss * opts["kd_weight"] + grad_kd, grad_loss * opts["mlm_weight"] + grad_mlm,
                                   stored, opts["kd_weight"], opts["mlm_weight"], mlm_grads)
        out = [None if g is None else g.to(like.dtype) for g, like in zip(grads, (hidden, weight, bias))]
        return (*out, None, None, None, None)


def fused_linear_kd(shards: ShardedHeads, backend: str, *, student_hidden, student_weight, teacher_hidden,
                    teacher_weight, student_bias=None, teacher_bias=None, labels=None, ignore_index=-100,
                    temperature=1.0, kd_weight=1.0, mlm_weight=0.0, kind="kl", reduction="batchmean", t2_scale=True,
                    mask=None, row_weights=None, teacher_topk=None, teacher_targets=None,
                    beta=0.5) -> KDOutput:
    """``kdfast.fused_linear_kd`` (validated keyword arguments, local shards) on vocabulary-sharded heads.
    ``backend`` must be able to run on the tensors' device; the row arithmetic is torch operations on any
    (see the module's docstring). ``teacher_targets`` is refused earlier (``shard_heads``)."""
    reason = None if backend == "auto" else _backends.backend_ready(backend, student_hidden.device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run fused_linear_kd: {reason}. backend='torch' always works")
    if kd_term(kind, beta) == "reverse_kl" and teacher_topk is not None and teacher_topk < shards.vocab:
        raise ValueError(f"teacher_topk: expected None with kind={kind!r}, beta={beta} (reverse KL: KL(q || p) is "
                         f"infinite where the top-k teacher has p = 0), got {teacher_topk}")
    opts = dict(shards=shards, labels=labels, ignore_index=ignore_index,
                temperature=float(temperature), kd_weight=float(kd_weight), mlm_weight=float(mlm_weight), kind=kind,
                reduction=reduction, t2_scale=bool(t2_scale), mask=mask, row_weights=row_weights,
                teacher_topk=teacher_topk, beta=float(beta), chunk_rows=None)
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    loss, kd, mlm = _ShardedFusedLinearKD.apply(student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                                         teacher_weight.detach(), teacher_bias, opts)
    return KDOutput(loss, kd, mlm)
