"""Vocabulary KD benchmark: same as ``kdfast bench kernels --op vocab_kd [args]`` (see benchmarks/README.md)."""
import sys

from kdfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", "--op", "vocab_kd", *sys.argv[1:]]))
