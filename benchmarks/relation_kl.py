"""Relation KL benchmark: same as ``kdfast bench kernels --op relation_kl [args]`` (see benchmarks/README.md).

``--long PATH`` instead measures the kdfast peak memory of one fwd+bwd at L=8192 (B=8, H=768, A_r=12)
and writes it to PATH as JSON (``--device``/``--dtype`` as for the kernels benchmark).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from kdfast.bench.kernels import DEFAULT_DTYPES, DTYPES, environment
from kdfast.bench.ops.relation_kl import long_context
from kdfast.cli import main


def long_run(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--long", required=True, metavar="PATH")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else DEFAULT_DTYPES[device.type]
    results = long_context(device, dtype)
    for r in results:
        print(f"relation_kl kdfast[{r['backend']}] {r['shape']} {r['dtype']}: peak {r['peak_mb']:.1f} MB")
    path = Path(args.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**environment(device, False), "results": results}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if "--long" in sys.argv[1:]:
        sys.exit(long_run(sys.argv[1:]))
    sys.exit(main(["bench", "kernels", "--op", "relation_kl", *sys.argv[1:]]))
