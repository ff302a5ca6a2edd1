#!/usr/bin/env bash
# Creates (or reuses) the virtualenv, installs the pinned dependencies, installs
# this project in editable mode and generates the proto code. Idempotent.
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
fi
pip=("$venv/bin/pip" install -q --disable-pip-version-check)

# torch first and alone: the PyPI wheel is large (CUDA build); pip keeps it once there.
torch_pin=$(grep -E '^torch==' requirements/requirements.txt)
"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "$torch_pin"
"${pip[@]}" -r requirements/requirements.txt
"$venv/bin/python" -c "import lightfm._lightfm_fast" 2>/dev/null || scripts/install_lightfm.sh "$venv"
# Generate first: the editable install maps the generated `coldstart` package too.
"$venv/bin/python" -m services.common.protogen
"${pip[@]}" --no-deps -e .
