"""hidden mse benchmark: same as ``kdfast bench kernels --op hidden_mse [args]`` (see benchmarks/README.md)."""
import sys

from kdfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", "--op", "hidden_mse", *sys.argv[1:]]))
