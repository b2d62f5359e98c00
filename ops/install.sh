#!/usr/bin/env bash
# Create .venv (if missing) and install Shuttle with its pinned dependencies and the dev extras.
# Skipped when nothing changed: the install is stamped with pyproject.toml's hash (an editable install
# picks up code changes by itself). SHUTTLE_REINSTALL=1 forces it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.shuttle-install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "${SHUTTLE_REINSTALL:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c "import producer.cli" 2>/dev/null; then
  exit 0
fi
echo "installing Shuttle into .venv (pyproject.toml changed or first install) ..."
# setuptools' deprecation notices are for package authors, not for someone installing: the variable
# reaches the build backend's process too, where they are raised.
export PYTHONWARNINGS="ignore::DeprecationWarning,ignore::UserWarning"  # SetuptoolsDeprecationWarning is a UserWarning
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
echo "$want" > "$stamp"
