#!/usr/bin/env bash
# The context-switch issue's GPU comparison, as one script for a CUDA machine (an H100/H200; about 3 minutes).
# Runs from the repository root without installing (PYTHONPATH), under the machine's python3.
#
#   bash benchmarks/gpu/context_switch.sh       # results under $OUT (default benchmarks/results/gpu)
#
# What it needs beside the repository, in .gpucarry/ (ignored by git; carry it to the machine):
#   whl/       wheels of the server's packages the GPU image lacks (fastapi, starlette, pydantic, pydantic-core,
#              annotated-types, typing-inspection, typing-extensions, uvicorn, opentelemetry-api), for python 3.12
#   smollm2/   SmolLM2-135M's config.json and tokenizer files (from the bundled model's converted directory):
#              the served model is a random-weight copy of it (benchmarks/gpu/random_model.py), since the
#              bundled GGUF package is not on the machine
# To make it (on a machine with the bundled model and network):
#   d=$(python -c "from tokenyard.model.loader import resolve_model; print(resolve_model(None).hf_dir)")
#   mkdir -p .gpucarry/smollm2 && cp "$d"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpucarry/smollm2/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .gpucarry/whl fastapi starlette pydantic pydantic-core annotated-types \
#     typing-inspection typing-extensions uvicorn opentelemetry-api      # pin the versions your .venv has
# The swap exactness tests on CUDA are part of benchmarks/gpu/check.sh.
#
# 1. KV copy throughput per segment size, device <-> pinned host (GB/s), beside the old layer-major gather.
# 2. Serving under priority churn, same server flags but the preemption variant: per-block synchronous swap vs
#    groups + reuse (copies before the forward pass) vs all of FastSwitch (overlap on: side stream, pinned
#    memory, an event per transfer). FastSwitch's goal: >= 1.4x better P99 TTFT and >= 3x better P99.9 TBT
#    than synchronous per-block swap.
# shellcheck source=benchmarks/gpu/env.sh
. "$(dirname "$0")/env.sh"
if [ -d .gpucarry/whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpucarry/whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
MODEL=/tmp/smollm2-random
"$PY" benchmarks/gpu/random_model.py --like .gpucarry/smollm2 --out "$MODEL" || exit 1
WORK=/tmp/context_switch
timeout "${CS_TIMEOUT:-200}" "$PY" benchmarks/bench_context_switch.py --model "$MODEL" --dtype bfloat16 \
    --copy-device cuda --variants swap-sync,no-overlap,fastswitch --num-prompts "${CS_PROMPTS:-128}" \
    --request-rate 6 --num-kv-blocks 300 --server-args "--device cuda --max-num-seqs 48" \
    --out "$WORK/context_switch.json" 2>&1 | tee "$OUT/context_switch.txt" | tail -30
cp "$WORK/context_switch.json" "$WORK/context_switch.png" "$OUT/" 2>/dev/null
if [ ! -f "$OUT/context_switch.json" ]; then   # keep the last server log for the post-mortem
    tail -80 "$(ls -t "$WORK"/context_switch/*.server.log 2>/dev/null | head -1)" > "$OUT/server_tail.txt" 2>/dev/null
fi
