# Sourced by the GPU scripts: run from the repository root without installing (PYTHONPATH), under the
# machine's python3 (or $PYTHON), results under $OUT (default benchmarks/results/gpu).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
