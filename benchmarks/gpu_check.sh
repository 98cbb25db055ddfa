#!/usr/bin/env bash
# Every check of the CUDA path that needs a real GPU (issue 3), as one prepared run sized for a
# 15-minute lease: one device command of at most 9 minutes (each stage has its own time limit).
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh     # in the repository root, on the GPU machine
#
# Stages: install (editable, no dependencies: the machine may have no network), versions and
# GPU, fastclip.warmup(cuda=True) (the cold compile, timed), the `gpu`-marked tests, the benchmark of benchmarks/bench_cuda.py, and last
# benchmarks/bench_compile.py (torch's clip compiled by inductor; not needed for the targets, so
# only when STAGES names it).
# Logs and the benchmarks' JSON go to $OUT; a summary is printed last. Exit status: 0 when the
# stages that ran (warmup, tests, bench_cuda.py; with STAGES, those it names) all passed.
#
# The default stages' limits add up to 8.8 minutes (warmup 150 s, tests 200 s, bench 180 s), so
# one call with the device tool's timeout_s=580 fits a lease of 15 device minutes with its start.
# STAGES picks the stages of one call, e.g. STAGES="compile" afterwards on the same warm machine
# (install and versions always run; the numba cache from the first call makes later warmups fast).
set -uo pipefail
STAGES=${STAGES:-warmup tests bench}
for stage in $STAGES; do
  case $stage in warmup|tests|bench|compile) ;; *) echo "gpu_check: unknown stage '$stage' in STAGES" >&2; exit 2 ;; esac
done
want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
rm -f "$OUT/gpu_tests_core.log" "$OUT/gpu_tests.log"  # the summary reports this run's tests only
cd "$(dirname "$0")/.."

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
rc_install=$?
[ $rc_install -eq 0 ] || { tail -20 "$OUT/install.log"; exit 1; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  python3 - <<'EOF'
import importlib.metadata as md, platform, torch


def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "|", ", ".join(f"{d} {version(d)}" for d in ("numba", "numba-cuda", "cuda-core", "cuda-bindings")))
import numpy
print("numpy", numpy.__version__)
try:
    from fastclip import _cuda
    print("fastclip CUDA backend available:", _cuda.is_available())
except Exception as exc:  # numba-cuda missing or unusable: every later stage would time torch
    print("fastclip CUDA backend available: False,", repr(exc))
EOF
} 2>&1 | tee "$OUT/versions.txt"

# Compile (and cache) every kernel, CPU and CUDA, through fastclip.warmup(cuda=True): times the
# cold compile a fresh container would pay, and keeps it out of the per-test time limits below.
rc_warmup=skipped
if want warmup; then
  timeout 150 python3 -c "import json, fastclip; print('warmup s:', json.dumps(fastclip.warmup(cuda=True)))" \
    2>&1 | tee "$OUT/warmup.log"
  rc_warmup=$?
fi

# The GPU tests: parity with the exact reference, bit-equality with torch's ops, the sync-debug
# "error" mode, graph capture and replay, streams, mixed devices, both launch paths; and the
# gpu-marked tests of AMP, stats, clip_and_step, GradClipper and AGC.
# A test that hangs (a kernel that never finishes, say) fails alone where pytest-timeout is there.
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 90)
# tests/test_cuda_gpu.py (parity, sync-debug, graphs) runs first, so that it has run even where
# the stage's 200 s run out; the other files' gpu tests get the time left.
gpu_tests() {  # LIMIT LOG ARGS...
  local limit=$1 log=$2
  shift 2
  FASTCLIP_REQUIRE_GPU=1 timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs \
    "${per_test[@]}" "$@" 2>&1 | tee "$OUT/$log"
}
rc_tests=skipped
if want tests; then
  deadline=$((SECONDS + 200))
  gpu_tests 200 gpu_tests_core.log tests/test_cuda_gpu.py
  rc_core=$?
  left=$((deadline - SECONDS))
  [ $left -ge 10 ] || left=10
  gpu_tests $left gpu_tests.log --ignore=tests/test_cuda_gpu.py tests/
  rc_rest=$?
  rc_tests=$((rc_core > rc_rest ? rc_core : rc_rest))
fi

# The benchmark against torch.nn.utils.clip_grad_norm_(foreach=True), in the same run.
rc_bench=skipped
if want bench; then
  timeout 180 python3 benchmarks/bench_cuda.py --out "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log"
  rc_bench=$?
fi

# Last (optional for the targets): torch's clip compiled by inductor vs fastclip, gpt2-124m.
rc_compile=skipped
if want compile; then
  timeout 150 python3 benchmarks/bench_compile.py --device cuda --json "$OUT/bench_compile.json" \
    2>&1 | tee "$OUT/bench_compile.log"
  rc_compile=$?
fi

echo
echo "== gpu_check: install rc=$rc_install, warmup rc=$rc_warmup, gpu tests rc=$rc_tests," \
  "bench rc=$rc_bench, compile bench rc=$rc_compile (124 = timed out)"
for log in gpu_tests_core.log gpu_tests.log; do
  [ -f "$OUT/$log" ] && tail -n 1 "$OUT/$log" | sed "s/^/   $log: /"
done
for rc in "$rc_warmup" "$rc_tests" "$rc_bench" "$rc_compile"; do
  [ "$rc" = 0 ] || [ "$rc" = skipped ] || exit 1
done
