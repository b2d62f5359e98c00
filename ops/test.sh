#!/usr/bin/env bash
# The test command: install, make sure the services run, run the whole suite (arguments go to pytest).
# Test processes share the suite by group (tests/conftest.py: a fault case with all its tests, any other file
# whole), so session fixtures are built once per group. The end-to-end and fault tests mostly wait on
# workers, servers and healing timeouts, so four processes run well on 2 cores (13.5 min, against about
# twice that with two).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/install.sh
ops/services.sh
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${SHUTTLE_TEST_PROCESSES:-4}" --dist loadgroup "$@"
