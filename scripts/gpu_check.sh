#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one short run for a machine that has one (CI has none, so they are skipped
# there): the CUDA tests, then `python scripts/bench.py --device cuda --grid --write`, which writes the GPU section of
# docs/benchmarks.md (the CPU section is left alone). Expects python3 with a CUDA build of torch and charrnn's other
# dependencies (PYTHON overrides the interpreter); charrnn itself is taken from this checkout. With $OUT set, the
# logs and docs/benchmarks.md are also copied there. About 5 minutes on one GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-}
"$PY" -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_check: torch sees no CUDA device')"
log() { if [ -n "$OUT" ]; then tee "$OUT/$1"; else cat; fi; }
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_bench.py 2>&1 | log tests.log
"$PY" scripts/bench.py --device cuda --grid --write 2>&1 | log bench.log
if [ -n "$OUT" ]; then cp docs/benchmarks.md "$OUT/"; fi
