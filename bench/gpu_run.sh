#!/usr/bin/env bash
# Everything a lent GPU machine (device tool) is for, in one call: build the extension with the
# CUDA kernels, run the whole test suite on the GPU, run both benchmarks; results under $OUT.
#   device run: bash bench/gpu_run.sh [STAGE ...]     (carry: .whl .gpu-cache)
# Stages, in the order given (default: build nosync graphs fsdp probe tests bench memory):
#   build         compile sam_kernels._C (CUDA kernels for sm_90); reuses .gpu-cache/_C.so.gz when
#                 it was built from the same csrc/ + setup.py (the device keeps nothing between calls:
#                 copy $OUT/_C.so.gz and $OUT/triton-cache.tgz to .gpu-cache/ and carry it)
#   nosync        the no-host-read tests of every optimizer and the guard's, on the GPU (seconds)
#   graphs        capturable optimizers and make_graphed_step on the GPU (python_tests/test_graphs.py,
#                 test_capturable.py), then the graphed training-step
#                 benchmark (python -m sam_kernels.bench --graphed: timm resnet18 CIFAR-size, ViT-S/16 bf16)
#   fsdp          FSDP2 with world size 1 on CUDA (nccl needs a GPU per rank): examples/fsdp2_sam.py for
#                 every optimizer class, the kernels on the local shards, and the memory profiler's
#                 per-rank bytes with --fsdp (seconds)
#   tests         python_tests on the GPU (pytest-xdist workers)
#   probe         the kernel and step benchmarks only: ViT-B shapes, the flat 134M tensor, and host_152
#                 (ViT-B's 152 tensors at 256 elements: the host's time per step), both GPU backends
#   bench         python -m sam_kernels.bench (kernels, peers, training steps) with JSON/markdown/plot
#   memory        python -m sam_kernels.memory with JSON/plot
#   pytest-bench  pytest bench --benchmark-only
# Each stage is capped so that the whole call ends within BUDGET_S (default 560 s) and what ran
# comes back. With 15 device minutes a session, one call of the default stages (~9 minutes, the
# build included) is the plan; `build nosync probe` alone takes ~5. The image has torch (CUDA), triton, ninja, pytest(-xdist), hypothesis,
# pytest-benchmark, matplotlib; pytorch_optimizer travels as a wheel in .whl (see the device README).
set -uo pipefail
OUT=${OUT:-bench/results/gpu-run}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build nosync graphs fsdp probe tests bench memory)

left() { echo $((BUDGET_S - SECONDS)); }
capped() {  # capped SECONDS CMD...: run CMD for at most SECONDS, or what is left of the budget
  local cap=$1; shift
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 10 ]; then echo "skipped (budget spent): $*"; return 124; fi
  timeout --signal=INT --kill-after=15 "$t" "$@"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f .gpu-cache/triton-cache.tgz ] && mkdir -p ~/.triton && tar -xzf .gpu-cache/triton-cache.tgz -C ~/.triton
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
src_hash=$(cat setup.py csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* | sha1sum | cut -c1-12)
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
stamp=$(date +%Y-%m-%d)

for stage in "${stages[@]}"; do
  echo "=== $stage (t=${SECONDS}s)"
  case $stage in
    build)
      if [ -f ".gpu-cache/_C-$src_hash.so.gz" ]; then
        gunzip -c ".gpu-cache/_C-$src_hash.so.gz" > "sam_kernels/_C.$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX")[1:])')"
        echo "reused the carried build $src_hash"
      else
        { time capped 330 python3 setup.py -q build_ext --inplace; } > "$OUT/build.log" 2>&1 \
          || { tail -40 "$OUT/build.log"; exit 1; }
        tail -3 "$OUT/build.log"
        so=$(ls sam_kernels/_C*.so)
        strip --strip-unneeded -o /tmp/_C.so "$so" && gzip -c /tmp/_C.so > "$OUT/_C-$src_hash.so.gz"
      fi
      python3 -c "import sam_kernels; print('backends on cuda:', sam_kernels.backends.available('cuda'))" \
        | tee -a "$OUT/gpu.txt"
      ;;
    nosync)
      # the steps of every optimizer on the GPU under torch.cuda.set_sync_debug_mode("error") and
      # the dispatch mode that fails on host reads (python_tests/test_no_sync.py, MSAM's in
      # test_msam.py), first: the sync-free step is the GPU's promise and this takes seconds
      capped 120 python3 -m pytest python_tests/test_no_sync.py python_tests/test_guard.py python_tests/test_msam.py \
        -q -p no:cacheprovider \
        -k cuda -rfEs > "$OUT/nosync.log" 2>&1
      echo "nosync exit $?"; tail -5 "$OUT/nosync.log"
      ;;
    graphs)
      capped 150 python3 -m pytest python_tests/test_graphs.py python_tests/test_capturable.py -q -p no:cacheprovider \
        -rfEs > "$OUT/graphs-tests.log" 2>&1
      echo "graphs tests exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/graphs-tests.log" | head -20; tail -3 "$OUT/graphs-tests.log"
      capped 200 python3 -m sam_kernels.bench --graphed --json "$OUT/graphed-$dev-$stamp.json" \
        --markdown "$OUT/graphed-$dev-$stamp.md" 2>"$OUT/graphed.err" | tail -25
      ;;
    fsdp)
      for o in sam asam nusam gausssam psam; do
        capped 60 python3 -m torch.distributed.run --nnodes 1 --nproc_per_node 1 --master_addr 127.0.0.1 \
          --master_port 29511 examples/fsdp2_sam.py --steps 20 --optimizer $o 2>&1 | tail -3 | tee -a "$OUT/fsdp.log"
      done
      # each rank's bytes with FSDP2 on CUDA, the peak from the allocator (one rank: one GPU)
      capped 90 python3 -m torch.distributed.run --nnodes 1 --nproc_per_node 1 --master_addr 127.0.0.1 \
        --master_port 29512 -m sam_kernels.memory --fsdp --models vit_s,resnet56 --optimizers sgd,sam,nusam,psam \
        --batch 64 --json "$OUT/memory-fsdp-$dev-$stamp.json" 2>"$OUT/memory-fsdp.err" | tail -12 | tee -a "$OUT/fsdp.log"
      ;;
    tests)
      # 8 workers of 2 threads each: 16 workers with a 16-thread pool each oversubscribe the CPUs
      # and the CPU-side tests crawl. PYTEST_ARGS narrows the run (e.g. -k cuda).
      OMP_NUM_THREADS=2 capped 420 python3 -m pytest python_tests -q -p no:cacheprovider -n 8 --timeout 300 -rfEs \
        --durations=30 ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1
      echo "tests exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40; tail -3 "$OUT/tests.log"
      ;;
    probe)
      capped 150 python3 -m sam_kernels.bench --sets vit_b,flat_128m,host_152 --models "" --compiled no \
        --json "$OUT/probe-$dev-$stamp.json" 2>"$OUT/probe.err" | tail -60
      ;;
    bench)
      capped 330 python3 -m sam_kernels.bench --json "$OUT/bench-$dev-$stamp.json" \
        --markdown "$OUT/bench-$dev-$stamp.md" --plot "$OUT/bench-$dev-$stamp.png" 2>"$OUT/bench.err" | tail -80
      python3 bench/check_results.py "$OUT/bench-$dev-$stamp.json"
      ;;
    memory)
      capped 150 python3 -m sam_kernels.memory --json "$OUT/memory-$dev-$stamp.json" \
        --plot "$OUT/memory-$dev-$stamp.png" 2>"$OUT/memory.err" | tail -30
      python3 bench/check_results.py "$OUT/memory-$dev-$stamp.json"
      ;;
    pytest-bench)
      capped 120 python3 -m pytest bench --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$OUT/pytest-bench-$dev-$stamp.json" 2>&1 | tail -5
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
# At most 8 files come back: the results and logs go as one archive (unpack under bench/results/),
# beside the build and Triton's compiled kernels for the next call (carry them in .gpu-cache/).
if [ -d ~/.triton/cache ]; then
  tar -czf "$OUT/triton-cache.tgz" -C ~/.triton cache
  [ "$(stat -c %s "$OUT/triton-cache.tgz")" -gt 16000000 ] && rm "$OUT/triton-cache.tgz"
fi
(cd "$OUT" && tar -czf results.tgz --remove-files $(ls | grep -v -E '^(_C-.*[.]so[.]gz|triton-cache[.]tgz|results[.]tgz)$'))
ls -la "$OUT"
echo "done in ${SECONDS}s"
