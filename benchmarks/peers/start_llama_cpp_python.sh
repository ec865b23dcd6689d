#!/usr/bin/env bash
# Start llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) on the bundled GGUF,
# wait until /v1/models answers, and print its base URL on stdout.
#
#   bash benchmarks/peers/start_llama_cpp_python.sh [--port 8003] [--host 127.0.0.1] [--threads 2]
#        [--n-ctx 2048] [--model FILE.gguf] [--alias NAME] [--no-ignore-eos-shim] [--foreground]
#        [--install-only] [-- ARGS...]
#
# First run: creates a separate venv under ${TOKENYARD_CACHE_DIR:-~/.cache/tokenyard}/peers and
# `pip install 'llama-cpp-python[server]'` from the source distribution there, which compiles llama.cpp
# (CPU only, -march=native without AMX like build_llama_cpp.sh, without the multimodal library; several minutes on
# 2 cores; the log goes to peers/logs/). Later runs reuse the venv. --install-only stops after that.
#
# How it serves, from its source (llama_cpp/server/app.py, settings.py in the sdist):
#  * one request at a time: every completion holds a global lock (get_llama_proxy) for its whole length;
#    there is no batching of requests, and others queue on the lock.
#  * ServerSettings.interrupt_requests defaults to True: a streaming completion is cut short (a [DONE] is
#    sent mid-answer) as soon as another request waits on the lock. This script passes
#    --interrupt_requests False so that queued requests wait instead of truncating the running one.
#  * the completion request has no ignore_eos field (unknown fields are dropped), and a streamed
#    completion carries no usage at all (stream_options is not a field either). So by default the server
#    runs behind llama_cpp_python_server.py, which turns "ignore_eos": true into a logit bias of -1e9 on
#    every end-of-generation token of the vocabulary (llama_vocab_is_eog), the same thing llama-server's
#    ignore_eos does; --no-ignore-eos-shim runs the stock server.
# ARGS after `--` go to llama_cpp.server unchanged.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${BUILD_JOBS:-2}"
port=8003 host=127.0.0.1 threads=2 n_ctx=2048 model="" alias="" shim=1 foreground=0 install_only=0 extra=()
while (( $# )); do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --n-ctx) n_ctx="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --alias) alias="$2"; shift 2 ;;
        --no-ignore-eos-shim) shim=0; shift ;;
        --foreground) foreground=1; shift ;;
        --install-only) install_only=1; shift ;;
        --) shift; extra=("$@"); break ;;
        *) echo "start_llama_cpp_python: unknown argument $1" >&2; exit 2 ;;
    esac
done

venv="$PEERS_CACHE/venv-llama-cpp-python-$VERSION"
if [[ ! -f "$venv/.installed" ]]; then
    command -v cmake >/dev/null || { echo "start_llama_cpp_python: cmake not found" >&2; exit 1; }
    sdist="$(lcp_sdist "$VERSION")"
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    log="$PEERS_CACHE/logs/pip-llama-cpp-python-$VERSION.log"
    echo "start_llama_cpp_python: building llama-cpp-python $VERSION into $venv (log: $log)" >&2
    start=$(date +%s)
    amx=""
    [[ "$(uname -m)" == x86_64 ]] && amx="$NO_AMX"  # ggml's AMX path crashes here (see build_llama_cpp.sh)
    CFLAGS="$amx" CXXFLAGS="$amx" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF" \
        "$venv/bin/python" -m pip install -v "llama-cpp-python[server] @ file://$sdist" >"$log" 2>&1 || {
            tail -n 30 "$log" >&2
            echo "start_llama_cpp_python: pip install failed after $(( $(date +%s) - start )) s" >&2
            exit 1
        }
    "$venv/bin/python" -c 'import llama_cpp.server.app' >&2
    echo "$(( $(date +%s) - start ))" >"$venv/.installed"
    echo "start_llama_cpp_python: built in $(cat "$venv/.installed") s" >&2
fi
if (( install_only )); then
    echo "$venv"
    exit 0
fi

if [[ -z "$model" ]]; then
    model="$(bundled_gguf)"
    alias="${alias:-SmolLM2-135M-Instruct}"
fi
alias="${alias:-$(basename "$model" .gguf)}"
url="http://$host:$port"
entry=(-m llama_cpp.server)
(( shim )) && entry=("$here/llama_cpp_python_server.py")
cmd=("$venv/bin/python" "${entry[@]}" --model "$model" --model_alias "$alias" --host "$host" --port "$port"
     --n_threads "$threads" --n_threads_batch "$threads" --n_ctx "$n_ctx" --interrupt_requests False
     "${extra[@]}")

launch llama_cpp_python "$foreground" "$url/v1/models" "${cmd[@]}"
