#!/usr/bin/env bash
# The CUDA issue's GPU check, as one script for a CUDA machine (an H100/H200 with PyTorch and Triton; about
# 5 minutes). Runs from the repository root without installing (PYTHONPATH), under the machine's python3.
#
#   bash benchmarks/gpu/check.sh            # results under $OUT (default benchmarks/results/gpu)
#
# 1. The engine's tests on CUDA: every exactness test in fp32 (decode steps replayed from CUDA graphs, Triton
#    paged attention, swaps through the side stream and pinned memory), the device-path tests (graph capture
#    exact in fp32, the Triton kernel against SDPA in fp32/fp16/bf16, bf16 agreement with transformers, KV
#    sizing from --gpu-memory-utilization), the swap bookkeeping tests.
# 2. The throughput comparison: a random-weight ~1B Llama in bf16, 256 requests (prompts 128-1024, 256 output
#    tokens, EOS ignored), tokenyard vs transformers generate in static batches of 64; single stream; TTFT;
#    per-step time breakdown; bf16 agreement (teacher-forced) on that model. JSON: $OUT/gpu.json.
# shellcheck source=benchmarks/gpu/env.sh
. "$(dirname "$0")/env.sh"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" --timeout 150 -rs \
    tests/test_device_paths.py tests/test_engine_exact.py tests/test_kv_transfers.py 2>&1 \
    | tee "$OUT/tests.txt" | tail -25

timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/bench_gpu.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.txt" \
    | grep -v "^ \|^{\|^}" | tail -30
