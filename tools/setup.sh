#!/usr/bin/env bash
# Creates or refreshes ./.venv with everything timm-nat needs; a no-op when nothing changed.
#
# Why these steps: timm needs torchvision, and the registry's torchvision wheels are CUDA
# builds that only import with their matching torch, so both come from the registry as one
# pinned pair (they run on CPU too). natten is a source package whose build imports torch,
# so it is installed after torch without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH="torch==2.15.0 torchvision==0.29.2"
NATTEN="natten==0.21.7"
PYTHON="${PYTHON:-python3}"

stamp=.venv/.timm-nat-setup
want="$(cat pyproject.toml tools/setup.sh | sha1sum)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() {  # quiet pip that keeps its exit status (and drops this machine's find-links noise)
    local status=0 log; log="$(mktemp)"
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1 || status=$?
    grep -v "^WARNING: Location" "$log" || true
    rm -f "$log"
    return "$status"
}
echo "setup: installing $TORCH, $NATTEN and timm-nat into .venv (several GB on first run)"
pip install $TORCH
pip install --no-build-isolation $NATTEN
pip install -e ".[test]"
.venv/bin/python -c "import torch, torchvision, timm, natten, timm_nat" \
    || { echo "setup: .venv is incomplete (see pip output above)" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done"
