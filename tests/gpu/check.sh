#!/usr/bin/env bash
# Device checks for the codec, the host store, the Triton kernels at real sizes and a protected server,
# for a machine with one CUDA GPU (well under 8 minutes). Uses the machine's own torch and Triton;
# writes its outputs under ${OUT:-results/gpu}. Every step runs (with its own time limit) even when an
# earlier one fails; the last lines summarise them, and the exit status is 1 when any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
summary=()

step() {  # step NAME LOG SECONDS COMMAND...
  local name=$1 log=$2 limit=$3 started=$SECONDS rc
  shift 3
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$log"
  rc=${PIPESTATUS[0]}
  summary+=("$name: exit $rc in $((SECONDS - started)) s")
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$out/machine.txt"
step "codec Triton tests" codec-triton-tests.log 100 \
  python3 -m pytest -q -p no:cacheprovider tests/test_codec_triton.py
step "codec benchmark" codec-gpu.md 120 \
  python3 benchmarks/codec_bench.py --device cuda --backends triton,torch --sizes 64KiB,1MiB,16MiB,64MiB \
  --min-seconds 0.1
step "host store" store-gpu.log 60 python3 tests/gpu/store_check.py
step "kernels at real sizes" kernels-gpu.log 90 python3 tests/gpu/kernel_check.py
step "protected server" server-gpu.log 60 python3 tests/gpu/server_check.py

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
! grep -qv ': exit 0 in' "$out/summary.txt"
