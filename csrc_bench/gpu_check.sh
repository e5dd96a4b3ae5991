#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): GPU tests, the kernel benchmarks, the model benchmark, the training
# benchmark, the diffusion benchmark; logs and results to $OUT. Usage there: [STEPS="tests bench model train
# diffusion"] OUT=/some/dir bash csrc_bench/gpu_check.sh [pytest -k expression for the kernel benchmarks]. STEPS picks
# the steps (default all five, about 20 minutes: more than one call may take, so name fewer). MODEL_ARGS /
# TRAIN_ARGS / DIFFUSION_ARGS: more options for `python -m csrc_bench model` / `train` / `diffusion` (--smoke: a CPU
# dry run; train: --no-lpips, --budget is TRAIN_BUDGET).
#
# diffusers (model and train steps) is not on that machine: carry it as wheels. Once, here, in the repo root
# (/.whl/ is in .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# The model benchmark, `python -m csrc_bench model` (about 4 minutes with its torch.compile warm-ups), as one call:
#   run(command="STEPS=model bash csrc_bench/gpu_check.sh", carry=[".whl"], timeout_s=360)
# and with the GPU tests before it: STEPS="tests model", timeout_s=540. The training benchmark, `python -m
# csrc_bench train` (phase-1 step ours vs diffusers at 256px B32, phase-2 memory at 1024px; about 4 minutes,
# TRAIN_BUDGET=200 s of cases, torch.compile last if that leaves room), as one call:
#   run(command="STEPS=train bash csrc_bench/gpu_check.sh", carry=[".whl"], timeout_s=330)
# Its torch.compile cases (about 2-3 minutes each to compile) need a longer budget: TRAIN_BUDGET=450 TRAIN_TIMEOUT=500
# in the command, timeout_s=580.
# The diffusion benchmark, `python -m csrc_bench diffusion` (DiT-XL / U-ViT-H training step and inference on DC-AE-f32
# p1 vs SD-VAE-f8 p2 latents, ours vs diffusers' DiTTransformer2DModel; DIFFUSION_BUDGET=300 s of cases):
#   run(command="STEPS=diffusion bash csrc_bench/gpu_check.sh", carry=[".whl"], timeout_s=400)
# The modulated_layer_norm and state/apply kernel benchmarks alone: STEPS=bench and the -k expression
# "modulated or state or copy".
# Copy what comes back into csrc_bench/results/, then give_back.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/gpu-out}
STEPS=" ${STEPS:-tests bench model train diffusion} "
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site && python3 -c "import diffusers; print('diffusers', diffusers.__version__)"
else
  echo "no .whl/ wheels carried: diffusers is missing, the model and train benchmarks cannot run (see the top)"
fi
if [[ $STEPS == *" bench "* ]]; then  # the CUDA C++ baseline builds in the background while the tests run
  python3 -c "from csrc_bench.cuda_shortcut import extension; extension(); print('cuda extension built')" \
    > "$OUT/cuda-build.txt" 2>&1 &
  build=$!
fi
if [[ $STEPS == *" tests "* ]]; then
  start=$SECONDS
  timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -m gpu tests -rs > "$OUT/gpu-tests.txt" 2>&1
  echo "gpu tests: $((SECONDS - start)) s"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu-tests.txt" | tail -n 30
fi
if [[ $STEPS == *" bench "* ]]; then
  wait $build; tail -n 3 "$OUT/cuda-build.txt"
  start=$SECONDS
  python3 -m csrc_bench report --out "$OUT" --timeout "${MODULE_TIMEOUT:-150}" ${1:+-k "$1"} > "$OUT/bench.txt" 2>&1
  echo "benchmarks: exit $?, $((SECONDS - start)) s"
  grep -E "passed|failed|error|ran past" "$OUT/bench.txt" | tail -n 6
  grep -E "^\| " "$OUT/bench.txt" | grep -E "triton|copy" | cut -c1-150 | head -n 75
fi
if [[ $STEPS == *" model "* ]]; then  # prints a line per case as it ends; json + md after each case, png at the end
  start=$SECONDS
  timeout -k 10 "${MODEL_TIMEOUT:-270}" python3 -m csrc_bench model --out "$OUT" --budget "${MODEL_BUDGET:-220}" \
    ${MODEL_ARGS:-} 2>&1 | tee "$OUT/model.txt" | grep --line-buffered -E "^\[|parameters|Error|nothing measured"
  echo "model benchmark: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s"
  sed -n '/^## Targets/,$p' "$OUT/model.txt"
fi
if [[ $STEPS == *" train "* ]]; then  # a line per case as it ends; json + md after each case, png at the end
  start=$SECONDS
  timeout -k 10 "${TRAIN_TIMEOUT:-240}" python3 -m csrc_bench train --out "$OUT" --budget "${TRAIN_BUDGET:-200}" \
    ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.txt" \
    | grep --line-buffered -E "^\[|parameters, built|^[A-Za-z.]*Error|nothing measured"
  echo "train benchmark: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s"
  sed -n '/^## Targets/,$p' "$OUT/train.txt"
fi
if [[ $STEPS == *" diffusion "* ]]; then  # a line per case as it ends; json + md after each case, png at the end
  start=$SECONDS
  timeout -k 10 "${DIFFUSION_TIMEOUT:-340}" python3 -m csrc_bench diffusion --out "$OUT" \
    --budget "${DIFFUSION_BUDGET:-300}" ${DIFFUSION_ARGS:-} 2>&1 | tee "$OUT/diffusion.txt" \
    | grep --line-buffered -E "^\[|parameters|^[A-Za-z.]*Error|nothing measured"
  echo "diffusion benchmark: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s"
  sed -n '/^## Targets/,$p' "$OUT/diffusion.txt"
fi
# The device tool brings back at most 8 files: past that, the logs travel as one archive.
if (( $(find "$OUT" -type f | wc -l) > 8 )); then
  (cd "$OUT" && tar czf logs.tgz ./*.txt && rm ./*.txt)
  echo "more than 8 files: the logs are in $OUT/logs.tgz"
fi
