#!/usr/bin/env bash
# The whole test suite: unit tests, then integration tests against real TorchServe servers the tests start and stop.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
