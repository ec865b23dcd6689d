#!/usr/bin/env bash
# Start llama.cpp's llama-server (built and cached by build_llama_cpp.sh) on the bundled GGUF, wait until
# its /health answers, and print its base URL on stdout.
#
#   bash benchmarks/peers/start_llama_server.sh [--port 8001] [--host 127.0.0.1] [--slots 16]
#        [--ctx-per-slot 768] [--threads 2] [--model FILE.gguf] [--alias NAME] [--foreground] [-- ARGS...]
#
# --slots is llama-server's -np: how many requests it decodes together (continuous batching). Each slot
# gets ctx-size / np tokens of context, so -c is slots * ctx-per-slot; 768 holds a 512-token prompt,
# 128 output tokens and a margin. --alias is the model name /v1/models reports (default: the name
# tokenyard serves the bundled model under). ARGS after `--` go to llama-server unchanged.
# Without --foreground the server runs in the background (log and pid file under the cache dir; stop it
# with `kill PID`); with it, the script execs the server in the foreground (compare.py does this).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"

port=8001 host=127.0.0.1 slots=16 ctx_per_slot=768 threads=2 model="" alias="" foreground=0 extra=()
while (( $# )); do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        --slots) slots="$2"; shift 2 ;;
        --ctx-per-slot) ctx_per_slot="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --alias) alias="$2"; shift 2 ;;
        --foreground) foreground=1; shift ;;
        --) shift; extra=("$@"); break ;;
        *) echo "start_llama_server: unknown argument $1" >&2; exit 2 ;;
    esac
done

bin="$(bash "$here/build_llama_cpp.sh" | tail -n1)"
if [[ -z "$model" ]]; then
    model="$(bundled_gguf)"
    alias="${alias:-SmolLM2-135M-Instruct}"
fi
alias="${alias:-$(basename "$model" .gguf)}"
url="http://$host:$port"
cmd=("$bin" -m "$model" --host "$host" --port "$port" --alias "$alias"
     -np "$slots" -c $(( slots * ctx_per_slot )) -t "$threads" -tb "$threads" --cont-batching --no-webui
     "${extra[@]}")

launch llama_server "$foreground" "$url/health" "${cmd[@]}"
