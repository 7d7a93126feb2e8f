"""``kdfast selftest``: every backend available here against the float64 reference, in seconds.

For each op in ``kdfast._backends.OPS`` and each backend that is built and runs on the device, the
public function runs on fresh random inputs (small shapes, with masks) in fp32, and on CUDA also in
bf16. Its loss and gradients are compared with ``backend="torch"`` in float64 on the *same* inputs
(rounded to the tested dtype first): relative error ||out - ref|| / ||ref|| must stay within
``TOLERANCE[dtype]``. A backend that declines an input (say bf16 on a kernel that only takes fp32)
shows as ``skipped`` with its reason; an exception is a failure.

The benchmark suites call :func:`check` before timing, so numbers are only reported for a checked
engine. On CPU with ``TRITON_INTERPRET=1`` the Triton backend runs in its interpreter and is checked
as well.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import kdfast
from kdfast import _backends

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    """One (op, backend, dtype) check. ``status`` is "ok", "FAIL" or "skipped"."""

    op: str
    backend: str
    dtype: str
    status: str
    loss_err: Optional[float] = None
    grad_err: Optional[float] = None  # worst relative error over the gradients
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


# --------------------------------------------------------------------------- one small case per op

Call = Callable[[dict, str], "tuple[torch.Tensor, list[torch.Tensor]]"]


@dataclass
class Case:
    """Random inputs for one op. ``call(tensors, backend)`` runs the public function and returns
    (loss, the tensors whose gradients are compared); ``grads`` names the inputs that need them."""

    tensors: dict
    grads: tuple
    call: Call


def _key_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.rand(batch, length, generator=gen) < 0.8
    mask[:, 0] = True  # every sequence keeps at least one key
    return mask


def _vocab_cases(gen: torch.Generator) -> dict:
    rows, vocab, hs, ht = 24, 333, 16, 24
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.3] = -100

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    def kd_kl(t, backend):
        loss = kdfast.kd_kl(t["student"], t["teacher"], temperature=2.0, mask=t["mask"], backend=backend)
        return loss, [t["student"]]

    def fused_linear_kd(t, backend):
        out = kdfast.fused_linear_kd(t["hidden_s"], t["weight_s"], t["hidden_t"], t["weight_t"], t["bias_s"],
                                     t["bias_t"], labels=t["labels"], temperature=2.0, mlm_weight=0.5,
                                     teacher_topk=50, backend=backend)
        return out.loss, [t["hidden_s"], t["weight_s"], t["bias_s"]]

    return {
        "kd_kl": Case(dict(student=randn(rows, vocab, scale=3), teacher=randn(rows, vocab, scale=3),
                           mask=torch.rand(rows, generator=gen) < 0.7), ("student",), kd_kl),
        "fused_linear_kd": Case(dict(hidden_s=randn(rows, hs), weight_s=randn(vocab, hs, scale=0.5),
                                     bias_s=randn(vocab), hidden_t=randn(rows, ht),
                                     weight_t=randn(vocab, ht, scale=0.5), bias_t=randn(vocab), labels=labels),
                                ("hidden_s", "weight_s", "bias_s"), fused_linear_kd),
    }


def _attention_cases(gen: torch.Generator) -> dict:
    batch, heads, length, d_s, d_t = 2, 2, 19, 16, 32
    qk = dict(q_s=torch.randn(batch, heads, length, d_s, generator=gen),
              k_s=torch.randn(batch, heads, length, d_s, generator=gen),
              q_t=torch.randn(batch, heads, length, d_t, generator=gen),
              k_t=torch.randn(batch, heads, length, d_t, generator=gen), key_mask=_key_mask(batch, length, gen))
    relation = dict(x_s=torch.randn(batch, length, 32, generator=gen),
                    x_t=torch.randn(batch, length, 48, generator=gen), key_mask=_key_mask(batch, length, gen))

    def attention(fn):
        def call(t, backend):
            loss = fn(t["q_s"], t["k_s"], t["q_t"], t["k_t"], key_mask=t["key_mask"], backend=backend)
            return loss, [t["q_s"], t["k_s"]]
        return call

    def relation_kl(t, backend):
        return kdfast.relation_kl(t["x_s"], t["x_t"], 4, key_mask=t["key_mask"], backend=backend), [t["x_s"]]

    return {
        "attention_kl": Case(qk, ("q_s", "k_s"), attention(kdfast.attention_kl)),
        "relation_kl": Case(relation, ("x_s",), relation_kl),
        "attention_score_mse": Case(dict(qk), ("q_s", "k_s"), attention(kdfast.attention_score_mse)),
    }


def _hidden_case(gen: torch.Generator) -> Case:
    batch, length, hs, ht = 2, 19, 16, 24

    def hidden_mse(t, backend):
        proj = nn.Linear(hs, ht, device=t["weight"].device, dtype=t["weight"].dtype)
        with torch.no_grad():
            proj.weight.copy_(t["weight"])
            proj.bias.copy_(t["bias"])
        loss = kdfast.hidden_mse(t["h_s"], t["h_t"], proj=proj, mask=t["mask"], backend=backend)
        return loss, [t["h_s"], proj.weight, proj.bias]

    tensors = dict(h_s=torch.randn(batch, length, hs, generator=gen),
                   h_t=torch.randn(batch, length, ht, generator=gen),
                   weight=torch.randn(ht, hs, generator=gen) * hs ** -0.5, bias=torch.randn(ht, generator=gen),
                   mask=_key_mask(batch, length, gen))
    return Case(tensors, ("h_s",), hidden_mse)


def cases(seed: int) -> dict:
    """op -> Case, fresh random inputs from ``seed`` (CPU, fp32)."""
    gen = torch.Generator().manual_seed(seed)
    return {**_vocab_cases(gen), **_attention_cases(gen), "hidden_mse": _hidden_case(gen)}


# --------------------------------------------------------------------------- running and comparing


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _run(case: Case, backend: str, dtype: torch.dtype, device: torch.device):
    """(loss, grads) of the case on ``backend`` with floating inputs cast to ``dtype``."""
    tensors = {}
    for name, value in case.tensors.items():
        value = value.to(device)
        if value.is_floating_point():
            value = value.to(dtype).requires_grad_(name in case.grads)
        tensors[name] = value
    loss, leaves = case.call(tensors, backend)
    return loss, torch.autograd.grad(loss, leaves)


def _check_one(op: str, case: Case, backend: str, dtype: torch.dtype, device: torch.device) -> Result:
    name = str(dtype).replace("torch.", "")
    rounded = Case({k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v for k, v in case.tensors.items()},
                   case.grads, case.call)
    try:
        loss, grads = _run(rounded, backend, dtype, device)
    except ValueError as err:
        if f"backend={backend!r} cannot run" in str(err):
            return Result(op, backend, name, "skipped", detail=str(err).split(": ", 1)[-1])
        return Result(op, backend, name, "FAIL", detail=f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - a selftest reports every failure instead of stopping
        return Result(op, backend, name, "FAIL", detail=f"{type(err).__name__}: {err}")
    ref_loss, ref_grads = _run(rounded, "torch", torch.float64, device)
    loss_err = _rel_err(loss, ref_loss)
    grad_err = max(_rel_err(g, r) for g, r in zip(grads, ref_grads))
    ok = loss_err <= TOLERANCE[dtype] and grad_err <= TOLERANCE[dtype]  # False for NaN
    return Result(op, backend, name, "ok" if ok else "FAIL", loss_err, grad_err,
                  "" if ok else f"relative error above {TOLERANCE[dtype]:g}")


def available_backends(op: str, device: torch.device) -> list[str]:
    """Backends built here that implement ``op`` and run on ``device``."""
    return [b for b in _backends.BACKENDS
            if _backends.implemented(op, b) and _backends.backend_ready(b, device) is None]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check(device: str | torch.device | None = None, seed: Optional[int] = None,
          dtypes: Optional[Sequence[torch.dtype]] = None) -> list[Result]:
    """Check every (op, available backend, dtype) on ``device``; ``dtypes`` default: fp32 everywhere, bf16 too
    on CUDA. ``seed`` fixes the inputs (default: fresh random ones)."""
    device = torch.device(device or default_device())
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    if dtypes is None:
        dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    results = []
    for op, case in cases(seed).items():
        for backend in available_backends(op, device):
            results.extend(_check_one(op, case, backend, dtype, device) for dtype in dtypes)
    return results


def format_table(results: list[Result]) -> str:
    def err(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1e}"

    lines = [f"{'op':<20} {'backend':<8} {'dtype':<9} {'loss err':>9} {'grad err':>9}  status"]
    for r in results:
        lines.append(f"{r.op:<20} {r.backend:<8} {r.dtype:<9} {err(r.loss_err):>9} {err(r.grad_err):>9}  "
                     f"{r.status}{'  ' + r.detail if r.detail else ''}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                        help="where to run (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=None, help="fix the random inputs (default: fresh)")
    parser.add_argument("--dtypes", default=None, help="comma-separated among fp32, bf16, fp16 (default: fp32, "
                        "and bf16 on CUDA)")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("selftest: --device cuda requested but torch sees no CUDA device")
        return 2
    dtypes = None
    if args.dtypes:
        names = [name.strip() for name in args.dtypes.split(",") if name.strip()]
        if not names or any(name not in DTYPES for name in names):
            raise ValueError(f"dtypes: expected comma-separated names among {', '.join(DTYPES)}, got {args.dtypes!r}")
        dtypes = [DTYPES[name] for name in names]
    results = check(args.device, args.seed, dtypes)
    print(format_table(results))
    failed = [r for r in results if r.failed]
    checked = [r for r in results if r.status != "skipped"]
    tolerances = ", ".join(f"{str(d).replace('torch.', '')} {t:g}" for d, t in TOLERANCE.items())
    print(f"\n{len(checked) - len(failed)}/{len(checked)} checks passed on {args.device} "
          f"(relative error vs float64 reference; tolerance {tolerances})")
    return 1 if failed else 0
