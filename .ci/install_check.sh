#!/usr/bin/env bash
# The two ways to install (issue 25): a plain, build-isolated `pip install .` (the extension is
# built on first use, into a fresh cache) and a wheel built with `pip wheel --no-build-isolation`
# (the extension inside; no build on first use), each into a clean venv beside the pinned torch,
# each with a smoke test: import, the extension loaded, a fused SAM step on the C++ CPU kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SMOKE='
import torch, sam_kernels
from sam_kernels.ops import extension
assert extension.loaded(), extension.load_error()
m = torch.nn.Linear(4, 2)
opt = sam_kernels.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="cpu")
before = m.weight.detach().clone()
m(torch.randn(3, 4)).sum().backward()
opt.step(lambda: m(torch.randn(3, 4)).sum().backward())
assert not torch.equal(before, m.weight), "the step did not move the weights"
print("smoke OK:", sam_kernels._C.__file__)
'
venv() {
  "$PYTHON" -m venv "$WORK/$1"
  "$WORK/$1/bin/python" -m pip install -q --upgrade pip
  "$WORK/$1/bin/python" -m pip install -q --no-compile "$TORCH_SPEC"  # byte-compiling torch: a minute per venv
}

echo "install-check: pip install . (build isolation: the extension built on first use)"
venv plain
"$WORK/plain/bin/python" -m pip install -q .
(cd "$WORK" && SAM_KERNELS_CACHE="$WORK/cache" "$WORK/plain/bin/python" -c "$SMOKE")

echo "install-check: pip wheel --no-build-isolation . (the extension in the wheel)"
BIN="${VENV:-.venv}/bin"
"$BIN/python" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheels" .
venv wheel
"$WORK/wheel/bin/python" -m pip install -q "$WORK"/wheels/sam_kernels-*.whl
(cd "$WORK" && SAM_KERNELS_NO_JIT=1 "$WORK/wheel/bin/python" -c "$SMOKE")
echo "install-check: OK"
