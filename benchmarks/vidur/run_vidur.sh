#!/usr/bin/env bash
# Measure Vidur (PyPI vidur==0.0.26) simulation speed: requests simulated per wall second.
# usage: run_vidur.sh [TRACE_CSV] [NUM_REQUESTS] ["REPLICA COUNTS"]
#   defaults: /work/shared/data/traces/azure_llm_2023_conv.csv 10000 "1 16 64"
# env: VENV (/tmp/vidur-venv), WORK (/tmp/vidur-work), PROFILES (/work/shared/data/vidur-profiles),
#      REPEATS (2), OUT_JSON (<this dir>/vidur_speed.json)
# Everything runs under nice -n 19 with one thread. No network needed except PyPI for the install.
set -euo pipefail
TRACE=$(realpath "${1:-/work/shared/data/traces/azure_llm_2023_conv.csv}")
N=${2:-10000}
REPLICAS=${3:-"1 16 64"}
REPEATS=${REPEATS:-2}
VENV=${VENV:-/tmp/vidur-venv}
WORK=${WORK:-/tmp/vidur-work}
PROFILES=${PROFILES:-/work/shared/data/vidur-profiles}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT_JSON=${OUT_JSON:-$HERE/vidur_speed.json}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
NICE="nice -n 19"

# 1. venv + install (wheel from /tmp/vidur if present, else PyPI)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import vidur' 2>/dev/null; then
  $NICE python3.11 -m venv "$VENV"
  WHEEL=$(ls /tmp/vidur/vidur-0.0.26-*.whl 2>/dev/null | head -1 || true)
  $NICE "$VENV/bin/pip" install "${WHEEL:-vidur==0.0.26}"
fi
PY="$VENV/bin/python"

# 2. inputs: converted trace + offline HF cache with real mlp.csv and synthetic attention.csv
mkdir -p "$WORK/logs"; cd "$WORK"
rm -rf .vidur_cache simulator_output logs/*   # fresh predictor cache => first run trains
$NICE "$PY" "$HERE/make_vidur_inputs.py" --trace "$TRACE" --num-requests "$N" \
  --out-trace "$WORK/trace_$N.csv" --profiles "$PROFILES" --cache-dir "$WORK/.vidur_cache"

RF=random_forrest_execution_time_predictor_config
vidur_args() {  # $1 = number of replicas
  echo --replica_config_model_name meta-llama/Llama-2-7b-hf --replica_config_device h100 \
    --replica_config_network_device h100_dgx --replica_config_num_pipeline_stages 1 \
    --replica_config_tensor_parallel_size 1 --cluster_config_num_replicas "$1" \
    --global_scheduler_config_type round_robin --replica_scheduler_config_type sarathi \
    --sarathi_scheduler_config_chunk_size 512 --sarathi_scheduler_config_batch_size_cap 128 \
    --request_generator_config_type trace_replay --trace_request_generator_config_trace_file "$WORK/trace_$N.csv" \
    --trace_request_generator_config_max_tokens 4096 --trace_request_generator_config_prefill_scale_factor 1 \
    --trace_request_generator_config_decode_scale_factor 1 --trace_request_generator_config_time_scale_factor 1 \
    --execution_time_predictor_config_type random_forrest \
    --${RF}_model_profiling_dataset local/vidur-llama-2-7b-h100 --${RF}_network_profiling_dataset local/vidur-h100-dgx \
    --${RF}_cache_dir "$WORK/.vidur_cache" --${RF}_prediction_max_tokens_per_request 4096 \
    --${RF}_k_fold_cv_splits 3 --${RF}_num_training_job_threads 1 \
    --${RF}_num_estimators 16 --${RF}_max_depth 16 --${RF}_min_samples_split 2 \
    --no-metrics_config_enable_chrome_trace --no-metrics_config_store_plots \
    --no-metrics_config_write_json_trace --metrics_config_output_dir "$WORK/simulator_output"
}

# 3. runs (sequential). time_vidur.py == `python -m vidur.main` plus phase timers.
: > logs/timings.jsonl
for R in $REPLICAS; do
  for ((i = 1; i <= REPEATS; i++)); do
    CMD="$NICE $PY $HERE/time_vidur.py $(vidur_args "$R")"
    LOAD=$(cut -d' ' -f1 /proc/loadavg)
    T0=$(date +%s.%N)
    $CMD > "logs/r${R}_run$i.log" 2>&1
    T1=$(date +%s.%N)
    LINE=$(grep '^VIDUR_TIMING ' "logs/r${R}_run$i.log" | cut -d' ' -f2-)
    echo "$LINE" | "$PY" -c "import json,sys; d=json.load(sys.stdin); d.update(run=$i, process_wall_s=round($T1-$T0,3), loadavg_before=$LOAD, command=sys.argv[1]); print(json.dumps(d))" "$CMD" >> logs/timings.jsonl
    echo "replicas=$R run=$i: $LINE"
  done
done

# 4. summary json + table
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
AVX512=$(grep -m1 '^flags' /proc/cpuinfo | grep -qw avx512f && echo true || echo false)
"$PY" - "$OUT_JSON" "$CPU" "$AVX512" "$N" "$TRACE" <<'PYEOF'
import json, sys, os
import vidur, sklearn, pandas, numpy
out, cpu, avx, n, trace = sys.argv[1:6]
runs = [json.loads(l) for l in open("logs/timings.jsonl")]
first = runs[0]
warm_setup = [r["setup_s"] for r in runs[1:]] or [first["setup_s"]]
res = {
  "vidur_version": getattr(vidur, "__version__", "0.0.26"),
  "python": sys.version.split()[0], "sklearn": sklearn.__version__, "pandas": pandas.__version__, "numpy": numpy.__version__,
  "cpu": cpu, "avx512": avx == "true", "nproc": os.cpu_count(), "threads": 1, "nice": 19,
  "trace": trace, "num_requests": int(n),
  "model": "meta-llama/Llama-2-7b-hf", "device": "h100", "tp": 1, "pp": 1,
  "replica_scheduler": "sarathi(chunk_size=512, batch_size_cap=128)", "global_scheduler": "round_robin",
  "predictor": "random_forrest, grid n_estimators=[16] max_depth=[16] min_samples_split=[2], 3-fold CV, n_jobs=1, prediction_max_tokens_per_request=4096",
  "outputs": "chrome trace OFF, plots(png) OFF, json event trace OFF, wandb OFF; metrics collection + CSV metric files ON (write_metrics default)",
  "training_s_first_run": round(first["setup_s"] - min(warm_setup), 3),
  "note_timing": "loop_s = Simulator.run() event loop only (excludes import, config, predictor training/cache load, request generation and output writing). requests_per_s = num_requests / loop_s.",
  "runs": runs,
  "summary": {},
}
for r in runs:
    k = str(r["num_replicas"])
    s = res["summary"].setdefault(k, {"replicas": r["num_replicas"], "requests": r["num_requests"], "loop_s": [], "requests_per_s": [], "num_batches": r["num_batches"]})
    s["loop_s"].append(r["loop_s"]); s["requests_per_s"].append(r["requests_per_s"])
for s in res["summary"].values():
    s["best_requests_per_s"] = max(s["requests_per_s"])
json.dump(res, open(out, "w"), indent=2)
print(f"\nCPU: {cpu} (avx512: {avx}); training (first run) ~{res['training_s_first_run']} s")
print(f"{'replicas':>8} {'requests':>8} {'run':>3} {'setup_s':>8} {'loop_s':>8} {'output_s':>8} {'proc_s':>8} {'batches':>9} {'req/s':>8}")
for r in runs:
    print(f"{r['num_replicas']:>8} {r['num_requests']:>8} {r['run']:>3} {r['setup_s']:>8} {r['loop_s']:>8} {r['output_s']:>8} {r['process_wall_s']:>8} {r['num_batches']:>9} {r['requests_per_s']:>8}")
print(f"wrote {out}")
PYEOF
