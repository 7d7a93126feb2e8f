"""Benchmark op ``vocab_kd``: KD (KL at T=2, batchmean, T^2; or the shape's ``kind``: ``kdfast bench kernels
--kind reverse_kl``, JSD at beta = 0.5) + MLM cross-entropy through both LM heads, fwd+bwd, returning
(loss, d student_hidden, d student_weight).

Impls: ``kdfast:<backend>`` per kernel backend available, ``eager`` (materialised logits,
F.log_softmax + F.kl_div + F.cross_entropy, autograd), ``compile`` (torch.compile of eager),
``liger`` (LigerFusedLinearJSD beta=0 + LigerFusedLinearCrossEntropyLoss, CUDA with liger-kernel),
``floor`` (the four matmuls no implementation avoids: teacher logits, student logits, d_hidden, d_weight),
and on CPU ``floor_vocab_major`` (the same products on [V, rows] logits, a faster layout in MKL).

Shapes: BERT's V = 30522 with BERT widths, and LLM vocabularies (Llama 3 128256, Qwen2 151936, Gemma 3
262144) with Hs/Ht = 2048/4096 (``--shape V=151936``; 2048 rows on CPU, 8192 on CUDA). Every result
records ``analytic_peak_mb_cuda`` (the CUDA driver's two fp32 [C, V] logit chunks plus its fp32 d_hidden
and d_weight; C from ``CUDA_CHUNK_BYTES``), and kdfast's results ``chunk_phases_ms``: one chunk's time
in the driver's phases, measured with its phase hook.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch
import torch.nn.functional as F

import kdfast
from kdfast import _backends
from kdfast.bench import measure
from kdfast.functions import vocab_kd as driver

VOCAB = 30522
TEMPERATURE = 2.0
FULL_ROWS = (2048, 8192)
WIDTHS = ((384, 768), (768, 1024))  # (Hs, Ht)
LLM_VOCABS = (128256, 151936, 262144)  # Llama 3, Qwen2, Gemma 3
LLM_WIDTHS = (2048, 4096)  # (Hs, Ht)
LLM_ROWS = {"cpu": 2048, "cuda": 8192}  # CPU: ~15 min a vocabulary on 2 cores (eager's logits must dwarf a chunk)
REFERENCE_CHUNK = 512  # rows per float64 reference chunk
BETA = 0.5  # kind "jsd"
TAKES_KIND = True  # kdfast bench kernels --kind puts "kind" into every shape
PHASES = ("student_logits", "teacher_logits", "row_kernel", "d_hidden", "d_weight")


def shapes(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [{"rows": 1024, "V": VOCAB, "Hs": 384, "Ht": 768}]
    bert = [{"rows": n, "V": VOCAB, "Hs": hs, "Ht": ht} for hs, ht in WIDTHS for n in FULL_ROWS]
    hs, ht = LLM_WIDTHS
    return bert + [{"rows": LLM_ROWS[device.type], "V": v, "Hs": hs, "Ht": ht} for v in LLM_VOCABS]


def inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Hidden states ~N(0, 1) and heads scaled so logits have a std of about 2; every row labelled."""
    n, v, hs, ht = shape["rows"], shape["V"], shape["Hs"], shape["Ht"]

    def randn(*size, scale=1.0, grad=False):
        return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_(grad)

    return {"student_hidden": randn(n, hs, grad=True), "student_weight": randn(v, hs, scale=2 / hs**0.5, grad=True),
            "teacher_hidden": randn(n, ht), "teacher_weight": randn(v, ht, scale=2 / ht**0.5),
            "labels": torch.randint(0, v, (n,), device=device), "kind": shape.get("kind", "kl")}


def _grads(loss: torch.Tensor, x: dict) -> tuple:
    d_hidden, d_weight = torch.autograd.grad(loss, (x["student_hidden"], x["student_weight"]))
    return loss.detach(), d_hidden, d_weight


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def eager_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kind="kl") -> torch.Tensor:
    """What one writes without kdfast: both logit tensors in memory, fp32 softmaxes (JSD: TRL's logsumexp
    mixture)."""
    s = _at_least_fp32(F.linear(student_hidden, student_weight))
    with torch.no_grad():
        t = _at_least_fp32(F.linear(teacher_hidden, teacher_weight))
    log_q, log_p = F.log_softmax(s / TEMPERATURE, dim=-1), F.log_softmax(t / TEMPERATURE, dim=-1)
    if kind == "kl":
        kd = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    elif kind == "reverse_kl":
        kd = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    elif kind == "soft_ce":
        kd = -(log_p.exp() * log_q).sum() / s.shape[0]
    else:
        log_m = torch.logaddexp(log_q + math.log(1 - BETA), log_p + math.log(BETA))
        kd = (BETA * F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
              + (1 - BETA) * F.kl_div(log_m, log_q, reduction="batchmean", log_target=True))
    return kd * TEMPERATURE**2 + F.cross_entropy(s, labels)


def _eager(x: dict) -> tuple:
    return _grads(eager_loss(**x), x)


_compiled = {}


def _compile(x: dict) -> tuple:
    fn = _compiled.setdefault("eager", torch.compile(eager_loss, dynamic=False))
    return _grads(fn(**x), x)


def _kdfast(backend: str) -> Callable[[dict], tuple]:
    def run(x: dict) -> tuple:
        out = kdfast.fused_linear_kd(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                     x["teacher_weight"], labels=x["labels"], temperature=TEMPERATURE,
                                     kd_weight=1.0, mlm_weight=1.0, kind=x["kind"], beta=BETA, backend=backend)
        return _grads(out.loss, x)
    return run


def _liger() -> Callable[[dict], tuple]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)
    ce = LigerFusedLinearCrossEntropyLoss()

    def run(x: dict) -> tuple:
        kd = jsd(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
        loss = kd * TEMPERATURE**2 + ce(x["student_weight"], x["student_hidden"], x["labels"])
        return _grads(loss, x)
    return run


# The floors' logits, kept between calls as kdfast keeps its chunk workspace: a fresh [rows, V] buffer per
# call would add page faults (the kernel zeroing every new page) to the matmuls the floor stands for.
_FLOOR_LOGITS: "dict[tuple, torch.Tensor]" = {}


def _floor_logits(name: str, shape: tuple, device: torch.device) -> torch.Tensor:
    key = (name, tuple(shape), device)
    if key not in _FLOOR_LOGITS:
        _FLOOR_LOGITS[key] = torch.empty(shape, dtype=torch.float32, device=device)
    return _FLOOR_LOGITS[key]


def release_scratch() -> None:
    """Free the floors' kept logits (called before a peak is taken, so it counts them)."""
    _FLOOR_LOGITS.clear()


def _floor(x: dict) -> tuple:
    with torch.no_grad():
        hidden, weight, t_hidden = x["student_hidden"], x["student_weight"], x["teacher_hidden"]
        rows, vocab = hidden.shape[0], weight.shape[0]
        t = torch.mm(t_hidden, x["teacher_weight"].t(), out=_floor_logits("t", (rows, vocab), hidden.device))
        s = torch.mm(hidden, weight.t(), out=_floor_logits("s", (rows, vocab), hidden.device))
        return t, s @ weight, s.t() @ hidden


def _floor_vocab_major(x: dict) -> tuple:
    """The floor's four matmuls on vocabulary-major logits [V, rows] (W @ x^T), the layout kdfast's CPU
    driver fills: MKL runs them faster than the row-major ones, so this is the stricter CPU floor."""
    with torch.no_grad():
        hidden, weight, t_weight = x["student_hidden"], x["student_weight"], x["teacher_weight"]
        rows, vocab = hidden.shape[0], weight.shape[0]
        t = torch.mm(t_weight, x["teacher_hidden"].t(), out=_floor_logits("t_vm", (vocab, rows), hidden.device))
        s = torch.mm(weight, hidden.t(), out=_floor_logits("s_vm", (vocab, rows), hidden.device))
        return t, s.t() @ weight, s @ hidden


def impls(device: torch.device) -> dict[str, Callable[[dict], tuple]]:
    out = {}
    for backend in ("cpu", "triton", "cuda"):
        if _backends.implemented("fused_linear_kd", backend) and _backends.backend_ready(backend, device) is None:
            if backend == "triton" and device.type != "cuda":
                continue  # the Triton interpreter is a test tool, not a benchmark
            out[f"kdfast:{backend}"] = _kdfast(backend)
    out["eager"] = _eager
    out["compile"] = _compile
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        out["liger"] = _liger()
    if device.type == "cpu":
        out["floor_vocab_major"] = _floor_vocab_major
    out["floor"] = _floor
    return out


def analytic_peak_mb_cuda(shape: dict) -> float:
    """MiB the CUDA driver holds beyond its inputs: two fp32 [C, V] logit chunks (C rows from
    ``CUDA_CHUNK_BYTES``) plus the fp32 d_hidden [rows, Hs] and d_weight [V, Hs]; independent of rows x V
    except through d_hidden."""
    rows, vocab, hs = shape["rows"], shape["V"], shape["Hs"]
    chunk = driver.rows_within(rows, vocab, driver.CUDA_CHUNK_BYTES)
    return (2 * chunk * vocab * 4 + 4 * (rows * hs + vocab * hs)) / 2**20


def chunk_phases_ms(fn: Callable[[dict], tuple], x: dict, device: torch.device) -> dict:
    """One chunk of the fused driver through ``fn`` (fwd + bwd of the first C rows, C what the driver picks
    here): milliseconds per phase (``PHASES``), ``other`` (the rest of the call: selection, allocations,
    backward scaling) and ``total``, plus ``chunk_rows``."""
    rows = driver.chunk_rows(x["student_hidden"].shape[0], x["student_weight"].shape[0], device)
    part = {k: (v[:rows].detach().requires_grad_(v.requires_grad) if k in ("student_hidden", "teacher_hidden",
                                                                          "labels") else v) for k, v in x.items()}
    fn(part)  # warm-up
    timer = measure.PhaseTimer(device)
    with driver.phase_hook(timer.mark):
        total = measure.time_ms(lambda: fn(part), device)
    phases = {name: round(timer.ms.get(name, 0.0), 3) for name in PHASES}
    return {**phases, "other": round(total - sum(phases.values()), 3), "total": round(total, 3), "chunk_rows": rows}


def extra_fields(key: str, shape: dict, fn: Callable[[dict], tuple], x: dict, device: torch.device) -> dict:
    """``analytic_peak_mb_cuda`` for every impl; ``chunk_phases_ms`` for kdfast's."""
    fields = {"analytic_peak_mb_cuda": round(analytic_peak_mb_cuda(shape), 2)}
    if key.startswith("kdfast:"):
        fields["chunk_phases_ms"] = chunk_phases_ms(fn, x, device)
    return fields


def reference(x: dict) -> tuple:
    """float64 eager on the same (possibly 16-bit rounded) inputs, a chunk of rows at a time
    (both terms are means over rows, so chunk losses and gradients add up)."""
    n = x["student_hidden"].shape[0]
    weight = x["student_weight"].detach().double().requires_grad_(True)
    teacher_weight = x["teacher_weight"].detach().double()
    loss = torch.zeros((), dtype=torch.float64, device=weight.device)
    d_hidden, d_weight = [], torch.zeros_like(weight)
    for start in range(0, n, REFERENCE_CHUNK):
        part = slice(start, start + REFERENCE_CHUNK)
        hidden = x["student_hidden"][part].detach().double().requires_grad_(True)
        chunk_loss = eager_loss(hidden, weight, x["teacher_hidden"][part].double(), teacher_weight,
                                x["labels"][part], x["kind"]) * (hidden.shape[0] / n)
        g_hidden, g_weight = torch.autograd.grad(chunk_loss, (hidden, weight))
        loss += chunk_loss.detach()
        d_hidden.append(g_hidden)
        d_weight += g_weight
    return loss, torch.cat(d_hidden), d_weight
