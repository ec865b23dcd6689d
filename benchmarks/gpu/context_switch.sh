#!/usr/bin/env bash
# The context-switch issue's GPU check, as one script for a CUDA machine (an H100/H200; a few minutes).
#
#   bash benchmarks/gpu/context_switch.sh            # results under $OUT (default benchmarks/results/gpu)
#
# 1. The engine's exactness tests for swaps, on CUDA (the tests pick CUDA when it is there): forced
#    preemption, block groups / overlapped swaps / host reuse on and off, aborts mid-transfer, a later turn
#    loaded from the host tier. Overlapped swaps on CUDA are copies on a side stream from pinned host memory,
#    with an event per transfer (tokenyard/engine/swap_worker.py).
# 2. KV copy throughput per segment size, device <-> pinned host (GB/s), beside the old layer-major gather.
# 3. The serving comparison, same server flags but the preemption variant: per-block synchronous swap vs
#    groups + reuse (copies before the forward pass) vs all of FastSwitch (overlap on). FastSwitch's goal:
#    >= 1.4x better P99 TTFT and >= 3x better P99.9 TBT than synchronous per-block swap.
# Project dependencies missing on the machine travel as wheels in ./wheels (pip download them beforehand).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
if [ -d wheels ]; then
    python -m pip install -q --no-index --find-links wheels -e . || echo "wheel install failed; trying as is"
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt"
export TOKENIZERS_PARALLELISM=false
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_engine_exact.py tests/test_kv_transfers.py \
    -k "swap or preemption or next_turn or transfer or abort" 2>&1 | tee "$OUT/exact.txt" | tail -3
timeout 420 python benchmarks/bench_context_switch.py --copy-device cuda \
    --variants swap-sync,no-overlap,fastswitch --num-prompts 192 --request-rate 6 --num-kv-blocks 300 \
    --server-args "--device cuda --max-num-seqs 48" --out "$OUT/context_switch.json" 2>&1 | tail -30
