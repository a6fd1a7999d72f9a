#!/usr/bin/env bash
# Compile (not run) the CUDA kernels in csrc/cuda against a CUDA build of torch, so CUDA code
# never lands uncompiled on a machine without a GPU. Uses its own venv (.venv-cuda): the CUDA
# torch is large and must not replace the CPU torch of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_CHECK_VENV:-.venv-cuda}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-build-check: no nvcc under CUDA_HOME=$CUDA_HOME; skipped"
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$CUDA_TORCH_SPEC" ninja setuptools wheel
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
rm -rf build/cuda-check
"$VENV/bin/python" setup.py -q build_ext --build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib
so=$(find build/cuda-check/lib -name '_C*.so' | head -1)
test -n "$so"
# The CUDA kernels must be in the library we built: every runner the CUDA list ops and the step
# plans launch (count, not grep -q: an early grep exit would SIGPIPE nm and trip pipefail).
symbols=$(nm -C "$so")
for fn in perturb_runner restore_runner "sgd_runner<sam_kernels::decl::restore_sgd_, false, false>" \
          "sgd_runner<sam_kernels::decl::shift_restore_sgd_, false, true>" \
          "sgd_runner<sam_kernels::decl::sampa_update_sgd_, true, false>" \
          "adam_runner<sam_kernels::decl::restore_adam_, false, false>" \
          "adam_runner<sam_kernels::decl::shift_restore_adam_, false, true>" \
          "adam_runner<sam_kernels::decl::sampa_update_adam_, true, false>" preview_sgd_runner preview_adam_runner sumsq_runner \
          norm_finalize_runner guard_finalize_runner; do
  n=$(grep -c -F "sam_kernels::cuda::(anonymous namespace)::$fn(" <<<"$symbols" || true)
  if [ "$n" -eq 0 ]; then echo "cuda-build-check: sam_kernels::cuda::$fn missing from $so"; exit 1; fi
done
echo "cuda-build-check: OK ($so)"
