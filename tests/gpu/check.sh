#!/usr/bin/env bash
# Device checks for one CUDA GPU, under 8 minutes in all: the Triton kernels at real sizes, the stream
# ordering of every hand-over, GhostServe's real Protector on a protected pool under load, the host
# store's GPU path, protected servers (CUDA graphs and the overlapped loop on) where SGLang is installed,
# and the checkpoint path at the paper's scale against replicate. Needs the machine's torch and Triton,
# and structlog; SGLang only for the server step, which is reported as skipped (never as passed) on a
# machine without it: the other steps drive GhostServe's code on stand-in pools. Writes its outputs under
# ${OUT:-results/gpu}. Every step runs (with its own time limit) even when an earlier one fails; the
# last lines summarise them, and the exit status is 1 when any failed, preflight included.
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

preflight() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || return 1
  python3 -c 'import sys, torch, triton, structlog; assert torch.cuda.is_available(), "torch sees no GPU"; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())' || return 1
  echo "C compiler for the drain's native part: $(command -v "${CC:-cc}" || command -v gcc || echo none)"
  local free_mib
  free_mib=$(df --output=avail -m /dev/shm | tail -1)
  echo "/dev/shm free: $free_mib MiB"
  [ "$free_mib" -ge 4096 ] || { echo "/dev/shm has under 4 GiB free; the store and checkpoint steps need more"; return 1; }
}

started=$SECONDS
{ date -u; preflight; } 2>&1 | tee "$out/machine.txt"
summary+=("preflight: exit ${PIPESTATUS[0]} in $((SECONDS - started)) s")
if python3 -c 'import sglang' 2>/dev/null; then
  has_sglang=1
else
  has_sglang=0
  echo "sglang: not installed here; the protected-server step is skipped" | tee -a "$out/machine.txt"
fi
step "codec Triton tests" codec-triton-tests.log 45 \
  python3 -m pytest -q -p no:cacheprovider tests/test_codec_triton.py
step "kernels at real sizes" kernels-gpu.log 60 python3 tests/gpu/kernel_check.py
step "stream ordering" streams-gpu.log 45 python3 tests/gpu/stream_check.py
step "protected pool under load" protector-gpu.log 60 python3 tests/gpu/protector_check.py
step "host store" store-gpu.log 45 python3 tests/gpu/store_check.py
if [ "$has_sglang" = 1 ]; then
  step "protected servers" server-gpu.log 240 python3 tests/gpu/server_check.py
else
  summary+=("protected servers: skipped (sglang is not installed on this machine)")
fi
step "checkpoint path vs replicate" checkpoint-gpu.md 150 \
  python3 benchmarks/checkpoint_bench.py --device cuda --tokens 64,2048 --repeats 5

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
! grep -v -e ': exit 0 in' -e ': skipped (' "$out/summary.txt" >/dev/null
