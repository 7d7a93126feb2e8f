"""``kdfast bench kernels``: time every implementation of the fused losses, fwd+bwd, with the same
timing and memory measurement (kdfast/bench/measure.py), print a table and write JSON. Memory is the
peak of live tensor bytes during a call (``peak_mb``), and ``working_mb``: that peak less the bytes of
the results every implementation returns (``outputs_mb``: the loss and gradients; at LLM shapes the
fp32 d_weight [V, Hs] alone is 1 GiB), the memory an implementation chooses to use. Scratch kept between
calls (kdfast's CPU chunk workspace) is freed before the peak is taken, so the peak counts it; the timed
calls reuse it, as a training loop does. The repeats of
all implementations of a shape run in rotation, so drifting machine load biases none of them.

JSON: ``{"device", "device_name", "driver", "cuda", "torch", "triton", "transformers", "python", "threads",
"git_commit", "seed", "quick",
"results": [{"op", "impl", "backend", "shape", "dtype", "median_ms", "peak_mb", "outputs_mb",
"working_mb", "max_rel_err", "vs_floor", "peak_vs_eager", "working_vs_eager", ...}]}``, ``...`` being
what an op module's optional ``extra_fields`` adds. The op modules live in kdfast/bench/ops/
(interface in its ``__init__``).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from kdfast._buffers import release_workspaces
from kdfast._reduction import KINDS
from kdfast.bench import measure
from kdfast.bench.ops import FLOOR, OPS
from kdfast.runtime.environment import environment as runtime_environment

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", default="all", choices=OPS + ("all",), help="which op to time (default: all)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--impl", action="append", default=None,
                        help="only these impls (repeatable; 'floor' is always timed)")
    parser.add_argument("--shape", action="append", default=None, metavar="KEY=VALUE",
                        help="only the shapes with this value, or any of a comma list (repeatable, e.g. "
                             "--shape rows=2048 --shape Hs=384,2048 --shape V=30522,128256)")
    parser.add_argument("--kind", default=None, type=kind_list, metavar="KIND[,KIND...]|all",
                        help="the KD divergences of ops that take one (vocab_kd; default: its own, kl): one of "
                             f"{', '.join(KINDS)}, a comma list, or 'all'; one result row per kind and shape")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (default 2, quick 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")


def kind_list(text: str) -> tuple[str, ...]:
    """``--kind``: ``"jsd"``, ``"kl,jsd"`` or ``"all"`` (every kind of ``KINDS``) -> the kinds, in that order."""
    kinds = KINDS if text == "all" else tuple(k.strip() for k in text.split(","))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(KINDS)}, a comma list or 'all', got {text!r}")
    return kinds


def environment(device: torch.device, quick: bool) -> dict:
    """Where and with what the numbers were taken."""
    return {**runtime_environment(device), "seed": SEED, "quick": quick}


def _split(key: str) -> tuple[str, Optional[str]]:
    name, _, backend = key.partition(":")
    return name, backend or None


def _max_rel_err(outputs: tuple, reference: tuple) -> float:
    return max(measure.rel_err(out, ref) for out, ref in zip(outputs, reference))


def _shape_filter(pairs: Optional[list]) -> Callable[[dict], bool]:
    """``["rows=2048", "V=30522,128256"]`` -> a predicate keeping shapes whose values match (as strings): every
    key, any of its comma-separated values."""
    wanted = {key: value.split(",") for key, value in (pair.split("=", 1) for pair in (pairs or []))}
    return lambda shape: all(str(shape.get(key)) in values for key, values in wanted.items())


def bench_op(op: str, device: torch.device, dtype: Optional[torch.dtype], quick: bool, only: Optional[list],
             warmup: int, repeats: int, log: Callable[[str], None] = print,
             keep: Callable[[dict], bool] = lambda shape: True,
             kind: "Optional[str | Sequence[str]]" = None) -> list[dict]:
    """Time every impl of ``op`` on each of its shapes; one result dict per (shape, impl). ``kind`` (one kind or
    several) goes into each shape (``"kind"``) of an op whose module sets ``TAKES_KIND``: each shape is timed
    once per kind, the kinds of a shape one after the other."""
    module = importlib.import_module(f"kdfast.bench.ops.{op}")
    dtype = dtype or getattr(module, "DEFAULT_DTYPES", DEFAULT_DTYPES)[device.type]
    impls = module.impls(device)
    extra_fields = getattr(module, "extra_fields", lambda key, shape, fn, inputs, device: {})
    release_scratch = getattr(module, "release_scratch", lambda: None)
    if only:
        impls = {k: f for k, f in impls.items() if k == FLOOR or _split(k)[0] in only or k in only}
    results = []
    shapes = module.shapes(quick, device)
    if kind is not None and getattr(module, "TAKES_KIND", False):
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        shapes = [dict(shape, kind=k) for shape in shapes for k in kinds]
    for shape in filter(keep, shapes):
        torch.manual_seed(SEED)
        inputs = module.inputs(shape, dtype, device)
        reference = module.reference(inputs)
        errors, peaks, output_mb = {}, {}, {}
        for key, fn in impls.items():
            log(f"  {op} {shape} {key} ...")
            outputs = fn(inputs)  # the first warm-up call (compiles, if the impl does): checked, not timed
            errors[key] = None if key.startswith(FLOOR) else _max_rel_err(outputs, reference)  # floors: no loss
            output_mb[key] = sum(t.numel() * t.element_size() for t in outputs) / 2**20
            del outputs
            release_workspaces()  # so the peak counts the scratch an impl keeps between calls
            release_scratch()
            peaks[key] = measure.peak_mb(functools.partial(fn, inputs), device)
        bound = {key: functools.partial(fn, inputs) for key, fn in impls.items()}
        times = measure.interleaved_median_ms(bound, device, warmup=max(warmup - 1, 0), repeats=repeats)
        for key, fn in impls.items():
            name, backend = _split(key)
            results.append({"op": op, "impl": name, "backend": backend, "shape": dict(shape),
                            "dtype": str(dtype).replace("torch.", ""), "median_ms": round(times[key], 3),
                            "peak_mb": round(peaks[key], 2), "outputs_mb": round(output_mb[key], 2),
                            "working_mb": round(peaks[key] - output_mb[key], 2), "max_rel_err": errors[key],
                            **extra_fields(key, shape, fn, inputs, device)})
        floor = next((r["median_ms"] for r in results if r["impl"] == FLOOR and r["shape"] == shape), None)
        eager = next((r for r in results if r["impl"] == "eager" and r["shape"] == shape), None)
        for r in results:
            if r["shape"] == shape and floor:
                r["vs_floor"] = round(r["median_ms"] / floor, 3)
            if r["shape"] == shape and eager and eager["peak_mb"] > 0 and eager["working_mb"] > 0:
                r["peak_vs_eager"] = round(r["peak_mb"] / eager["peak_mb"], 3)
                r["working_vs_eager"] = round(r["working_mb"] / eager["working_mb"], 3)
        del inputs, reference
        release_workspaces()  # the next shape's impls start without this one's kept buffers
        release_scratch()
    return results


def format_table(results: list[dict]) -> str:
    head = (f"{'op':<14}{'impl':<19}{'backend':<9}{'shape':<56}{'dtype':<10}"
            f"{'ms':>10}{'x floor':>9}{'peak MB':>10}{'work MB':>10}{'rel err':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        ratio = f"{r['vs_floor']:.2f}" if r.get("vs_floor") else "-"
        lines.append(f"{r['op']:<14}{r['impl']:<19}{r['backend'] or '-':<9}{shape:<55} {r['dtype']:<10}"
                     f"{r['median_ms']:>10.1f}{ratio:>9}{r['peak_mb']:>10.1f}{r['working_mb']:>10.1f}{err:>10}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kdfast bench kernels: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else None
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    ops = OPS if args.op == "all" else (args.op,)
    results = []
    for op in ops:
        if importlib.util.find_spec(f"kdfast.bench.ops.{op}") is None:
            print(f"kdfast bench kernels: no benchmark module for {op} yet (kdfast/bench/ops/{op}.py)", file=sys.stderr)
            continue
        results += bench_op(op, device, dtype, args.quick, args.impl, warmup, repeats,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True), keep=_shape_filter(args.shape),
                            kind=args.kind)
    print(format_table(results))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**environment(device, args.quick), "results": results}, indent=1) + "\n")
        print(f"wrote {path}")
    return 0
