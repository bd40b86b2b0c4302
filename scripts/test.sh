#!/usr/bin/env bash
# The whole test suite: unit tests, then integration tests against real TorchServe servers the tests start and stop.
# Prints the 25 slowest tests, and every skip with its reason (-ra in pyproject.toml).
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests --durations=25 "$@"
