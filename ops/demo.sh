#!/usr/bin/env bash
# The demo command: install, make sure the services run, then `shuttle demo` (arguments go to it).
# With Docker instead: `cp .env.example .env` (set passwords), then `docker compose up demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/install.sh
ops/services.sh
exec .venv/bin/shuttle demo "$@"
