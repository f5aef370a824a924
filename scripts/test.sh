#!/usr/bin/env bash
# Installs charrnn with its dev extra into .venv and runs the test suite (no network, no GPU needed).
#   bash scripts/test.sh [pytest args]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh "[dev]" || exit 1
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests were collected"; rc=0; fi
exit "$rc"
