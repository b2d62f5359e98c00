#!/usr/bin/env bash
# The test command: install, make sure the services run, run the whole suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/install.sh
ops/services.sh
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
