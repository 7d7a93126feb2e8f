#!/usr/bin/env bash
# The device check (kdfast/apps/device_check.py): on a machine with a GPU, in at most 8 minutes, `kdfast selftest`
# on every GPU backend in fp32/bf16/fp16, the vocabulary, relation and attention-MSE benchmarks at the BERT shapes
# and one LLM shape (eager, compile, Liger when installed) and a budget calibration at the study's shapes, all in
# OUT/device_check.json. Without a GPU it says what it skipped and why (--smoke: quick CPU shapes instead).
#   benchmarks/device_check.sh [OUT] [--smoke] [--limit SECONDS] [--only JOB]
# From the checkout: the compiled extensions must be in place (python setup.py build_ext --inplace -t build/tmp);
# `kdfast info` first says which backends are built.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/device-check}"
[ $# -gt 0 ] && shift
python -m kdfast info
exec timeout 480 python -m kdfast device-check --out "$out" "$@"
