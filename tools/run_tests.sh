#!/usr/bin/env bash
# Install whatever is missing (tools/install.sh), then lint and run the whole
# test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMSSM_VENV:-$ROOT/.venv}"
bash "$ROOT/tools/install.sh"
cd "$ROOT"
echo '[tests] ruff check'
"$VENV/bin/ruff" check .
echo '[tests] ruff format --check'
"$VENV/bin/ruff" format --check .
echo '[tests] pytest'
exec "$VENV/bin/python" -m pytest "$@"
