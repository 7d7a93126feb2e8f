"""Time the CPU vocabulary-KD row kernel alone, per kind, interleaved (kl, reverse_kl, jsd, kl, ...), and print
the median nanoseconds per element and each kind's ratio to KL.

    python benchmarks/vocab_kd_row_kernel.py --rows 64 --vocab 30522 --layout vocab_major [--old OLD/_C.so]

``--old`` also times another build of ``kdfast._C`` (e.g. main's) in the same interleaving. Every row has a
label (the MLM term), T = 2, beta = 0.5; logits ~N(0, 2). One thread unless OMP_NUM_THREADS says otherwise.
``--clock cpu`` times the calling thread's CPU time instead of the wall clock: on a shared machine it leaves out
the time other jobs hold the core (it counts only this thread's work, so use it with OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from kdfast import _ext
from kdfast._reduction import KINDS

TIMED_KINDS = ("kl", "reverse_kl", "jsd")


def load_build(path: str):
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--layout", choices=("vocab_major", "row_major"), default="vocab_major")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--old", default=None, help="another build of kdfast._C to time alongside")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or this thread's CPU time (with OMP_NUM_THREADS=1 on a shared machine)")
    args = parser.parse_args()
    builds = {"this": _ext.require_cpu(), **({"old": load_build(args.old)} if args.old else {})}
    rows, vocab, vocab_major = args.rows, args.vocab, args.layout == "vocab_major"
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    s0, t0 = torch.randn(rows, vocab) * 2, torch.randn(rows, vocab) * 2
    layout = (lambda x: x.t().contiguous().t()) if vocab_major else (lambda x: x.contiguous())
    s, t = layout(s0), layout(t0)
    labels = torch.randint(0, vocab, (rows,))
    kd_coef, mlm_coef = torch.full((rows,), 0.01), torch.full((rows,), 0.01)
    kd_row, mlm_row = torch.empty(rows), torch.empty(rows)
    ld = s.stride(1) if vocab_major else s.stride(0)

    def once(build, kind: str) -> float:
        s.copy_(s0)
        t.copy_(t0)  # JSD uses t as scratch
        launch = build.vocab_kd_rows_vocab_major if vocab_major else build.vocab_kd_rows
        start = clock()
        launch(s.data_ptr(), t.data_ptr(), labels.data_ptr(), kd_coef.data_ptr(), mlm_coef.data_ptr(),
               kd_row.data_ptr(), mlm_row.data_ptr(), rows, vocab, ld, args.temperature, KINDS.index(kind), 0.5)
        return clock() - start

    times: dict = {}
    for _ in range(args.repeats):
        for name, build in builds.items():
            for kind in TIMED_KINDS:
                times.setdefault((name, kind), []).append(once(build, kind))
    for name in builds:
        ns = {k: statistics.median(times[(name, k)]) * 1e9 / (rows * vocab) for k in TIMED_KINDS}
        print(f"{name:5s} {args.layout:11s} V={vocab} rows={rows} T={args.temperature:g} {args.clock}: "
              + "  ".join(f"{k} {v:.2f} ns/elem ({v / ns['kl']:.2f}x kl)" for k, v in ns.items()))


if __name__ == "__main__":
    main()
