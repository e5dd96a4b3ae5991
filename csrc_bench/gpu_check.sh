#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): GPU tests, then every benchmark, logs and results to $OUT.
# Usage there: OUT=/some/dir bash csrc_bench/gpu_check.sh [pytest -k expression for the benchmarks]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
# the CUDA C++ baseline builds in the background while the tests run
python3 -c "from csrc_bench.cuda_shortcut import extension; extension(); print('cuda extension built')" \
  > "$OUT/cuda-build.txt" 2>&1 &
build=$!
start=$SECONDS
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -m gpu tests/kernels/test_shortcut.py tests/kernels/test_linear_attention.py -rs > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests: $((SECONDS - start)) s"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu-tests.txt" | tail -n 30
wait $build; tail -n 3 "$OUT/cuda-build.txt"
start=$SECONDS
python3 -m csrc_bench report --out "$OUT" --timeout "${MODULE_TIMEOUT:-150}" ${1:+-k "$1"} > "$OUT/bench.txt" 2>&1
echo "benchmarks: exit $?, $((SECONDS - start)) s"
grep -E "passed|failed|error|ran past" "$OUT/bench.txt" | tail -n 6
grep -E "^\| " "$OUT/bench.txt" | grep -E "triton|copy" | cut -c1-150 | head -n 75
