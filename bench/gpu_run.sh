#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): build the extension with the CUDA kernels,
# run the whole test suite on the GPU, run both benchmarks, and leave everything under $OUT.
#   device run: bash bench/gpu_run.sh
# The machine's image has torch (CUDA), triton, ninja, pytest, hypothesis and pytest-benchmark;
# pytorch_optimizer is not there: carry it as a wheel (.whl, see the device README) or the
# peer columns stay empty and its parity tests fail loudly.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
{ time python3 setup.py -q build_ext --inplace; } > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import sam_kernels, torch; print('backends on cuda:', sam_kernels.backends.available('cuda'))" | tee -a "$OUT/gpu.txt"
python3 -m pytest python_tests -q -p no:cacheprovider -x 2>&1 | tee "$OUT/tests.log" | tail -15
stamp=$(date +%Y-%m-%d)
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
python3 -m sam_kernels.bench --json "$OUT/bench-$dev-$stamp.json" --markdown "$OUT/bench-$dev-$stamp.md" \
  --plot "$OUT/bench-$dev-$stamp.png" 2>/dev/null | tail -80
python3 -m sam_kernels.memory --json "$OUT/memory-$dev-$stamp.json" --plot "$OUT/memory-$dev-$stamp.png" 2>/dev/null | tail -30
python3 -m pytest bench --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/pytest-bench-$dev-$stamp.json" \
  2>&1 | tail -5
