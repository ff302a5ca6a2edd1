#!/usr/bin/env bash
# LightFM 1.17 (the last release) has no wheels for this Python and its setup.py
# assigns to `__builtins__` as a module, which fails under PEP 517 builds
# (`'dict' object has no attribute '__LIGHTFM_SETUP__'`). We fetch the sdist from
# PyPI's file host, check its hash, patch that one line and build it against the
# numpy/scipy/cython already in the venv (--no-build-isolation).
set -euo pipefail
venv="$1"
url="https://files.pythonhosted.org/packages/1f/96/5ec230f5c27811534af0faaa8525f11c1000ee1c24c8a82c0546d0724aea/lightfm-1.17.tar.gz"
sha="2b77ada182ccd768a8d7643ab3cfcd8b6e855db09087f7cc7329bd63316697a8"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -sSfL -o "$work/lightfm.tar.gz" "$url"
echo "$sha  $work/lightfm.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/lightfm.tar.gz" -C "$work"
sed -i 's/^__builtins__.__LIGHTFM_SETUP__ = True/import builtins; builtins.__LIGHTFM_SETUP__ = True/' \
  "$work/lightfm-1.17/setup.py"
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation "$work/lightfm-1.17"
