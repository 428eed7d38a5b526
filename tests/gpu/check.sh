#!/usr/bin/env bash
# Device checks for the codec, the host store, the KV gather and a protected server, for a machine with one CUDA GPU (well under 8 minutes).
# Runs the Triton kernels compiled for the GPU against the torch reference on the GPU, then the codec
# benchmark on the device (Triton and torch next to device memcpy). Uses the machine's own torch and
# Triton; writes its outputs under ${OUT:-results/gpu}.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-results/gpu}
mkdir -p "$out"
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests/test_codec_triton.py 2>&1 | tee "$out/codec-triton-tests.log"
PYTHONPATH=. python3 benchmarks/codec_bench.py --device cuda --backends triton,torch 2>/dev/null \
  | tee "$out/codec-gpu.md"
PYTHONPATH=. python3 tests/gpu/store_check.py | tee "$out/store-gpu.log"
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests/test_sglang_layer.py -k triton_gather 2>&1 \
  | tee "$out/gather-triton-tests.log" || true
PYTHONPATH=. timeout 420 python3 tests/gpu/server_check.py | tee "$out/server-gpu.log"
