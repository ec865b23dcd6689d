#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only, Release) from the llama.cpp sources vendored in the
# llama-cpp-python source distribution on PyPI, and cache the binary:
#
#   ${TOKENYARD_CACHE_DIR:-~/.cache/tokenyard}/peers/llama-server-<llama-cpp-python version>
#
# A later run finds the cached binary and only prints its path. The last line of stdout is always the
# binary's path, so callers can do `bin=$(bash build_llama_cpp.sh | tail -n1)`.
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  sdist version to take llama.cpp from (default 0.3.36)
#   BUILD_JOBS                parallel compile jobs (default 2)
#   PYTHON                    python with pip, used only to download the sdist (default: python3)
#   LLAMA_CPP_CMAKE_ARGS      more cmake arguments (split on spaces)
#
# Needs cmake, a C++17 compiler and access to the package index; about 5 minutes on 2 cores. The binary is
# linked statically against llama/ggml (BUILD_SHARED_LIBS=OFF), so it can be moved. It is compiled for this
# CPU (GGML_NATIVE, the default) but WITHOUT Intel AMX: on this kind of machine (a Sapphire Rapids VM with
# amx_* in /proc/cpuinfo) ggml's AMX matmul (ggml_backend_amx_mul_mat) segfaults on the first forward pass,
# so the AMX instructions are masked out of -march=native (x86-64 only). HTTPS support, the web UI and its
# download at build time are turned off: the benchmark needs none of them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${BUILD_JOBS:-2}"
out="$PEERS_CACHE/llama-server-$VERSION"
log() { echo "build_llama_cpp: $*" >&2; }

if [[ -x "$out" ]]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi
command -v cmake >/dev/null || { log "cmake not found (apt-get install cmake, or pip install cmake)"; exit 1; }

# 1. The sdist (kept in the cache: llama-cpp-python's own build reuses it), then only its vendored llama.cpp.
sdist="$(lcp_sdist "$VERSION")"
work="$PEERS_CACHE/src/llama_cpp_python-$VERSION"
if [[ ! -f "$work/vendor/llama.cpp/CMakeLists.txt" ]]; then
    log "unpacking $sdist"
    rm -rf "$work"
    tar -xzf "$sdist" -C "$PEERS_CACHE/src" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi
src="$work/vendor/llama.cpp"
build="$work/build-server"

# 2. Configure and build the one target. Recent llama.cpp replaced curl by cpp-httplib + OpenSSL
# (LLAMA_CURL is deprecated and ignored there); both switches are passed so older and newer versions
# build without either.
generator=() flags=()
[[ "$(uname -m)" == x86_64 ]] && flags=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
command -v ninja >/dev/null && generator=(-G Ninja)
log "configuring llama.cpp from llama-cpp-python $VERSION (CPU only, Release)"
start=$(date +%s)
cmake -S "$src" -B "$build" "${generator[@]}" "${flags[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_CCACHE=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF ${LLAMA_CPP_CMAKE_ARGS:-} >&2
log "building target llama-server with $JOBS jobs"
cmake --build "$build" --config Release --target llama-server -j "$JOBS" >&2
bin="$build/bin/llama-server"
[[ -x "$bin" ]] || { log "build finished but $bin is missing"; exit 1; }
"$bin" --help >/dev/null 2>&1 || { log "$bin --help failed"; exit 1; }
cp "$bin" "$out.tmp" && mv "$out.tmp" "$out"
log "built $out in $(( $(date +%s) - start )) s"
echo "$out"
