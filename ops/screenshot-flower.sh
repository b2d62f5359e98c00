#!/usr/bin/env bash
# Retake docs/flower-tasks.png (Flower's task list during a demo run) in headless Chromium.
#   apt-get install -y chromium   # once
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${SHUTTLE_PYTHON:-.venv/bin/python}"
exec "$PY" ops/flower/screenshot.py "$@"
